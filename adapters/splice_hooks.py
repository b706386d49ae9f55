"""Hooks that put the splice (adapters/splice.py) into a transformers model, and record what it captures.

The hooks derive each token's position from the forward's `attention_mask` or KV-cache length (pads get -1)
and its token ids from `input_ids`. Per-batch settings (each row's modes and edits, explicit positions and
ids, top-k) are given as arguments of `Splice.batch(...)`, a context around the forward; nothing outside
this module assigns its fields.

    with splice(model, [sae], mode="replace", top_k=8) as sp:
        logits = model(input_ids).logits
        caps = sp.pop_captures()  # {sae_name: [Capture(indices (B,T,k), values (B,T,k), positions (B,T))]}

    with sp.batch(rows=[RowSpec(edits=[...]), RowSpec()], positions=pos, top_k=4):
        model(...)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from .edits import TRAIN_MODE, SpliceError, check_mode
from .hooks import backbone, decoder_layers
from .saes import LoadedSAE
from .splice import Capture, RowSpec, SpliceStats, check_rows, fit_positions, splice_sae

__all__ = ["Batch", "Splice", "splice"]


@dataclass(frozen=True)
class Batch:
    """Settings of the forwards inside one `Splice.batch(...)` context (None: derived, or the Splice's own)."""

    rows: Sequence[RowSpec] | None = None
    positions: torch.Tensor | None = None  # (1 or B, T) explicit positions, -1 = padding
    token_ids: torch.Tensor | None = None  # (1 or B, T) explicit token ids, for the policy's kept ids
    top_k: int | None = None


class Splice:
    """SAEs spliced into a model's residual stream by forward hooks. Use as a context manager, or `splice()`."""

    def __init__(self, model: torch.nn.Module, saes: Sequence[LoadedSAE], mode: str = TRAIN_MODE,
                 top_k: int = 0, dense: bool = False, stats: bool = False,
                 rows: Sequence[RowSpec] | None = None) -> None:
        names, hooks = [s.name for s in saes], [s.hook.name for s in saes]
        if len(set(names)) != len(names):
            raise SpliceError(f"SAE names must be unique, got {names}")
        if len(set(hooks)) != len(hooks):
            raise SpliceError(f"One SAE per hook point, got {hooks}")
        check_mode(mode)
        if top_k < 0:
            raise SpliceError(f"top_k must be >= 0, got {top_k}")
        self.model, self.saes = model, {s.name: s for s in saes}
        self.mode, self.top_k, self.dense, self.stats_enabled = mode, top_k, dense, stats
        if rows is not None:
            check_rows(self.saes, rows)
        self._batch = Batch(rows=rows)
        self._stats: dict[str, list[SpliceStats]] = {n: [] for n in self.saes}
        self._captures: dict[str, list[Capture]] = {n: [] for n in self.saes}
        self._dense: dict[str, list[torch.Tensor]] = {n: [] for n in self.saes}
        self._stops: dict[str, list[torch.Tensor]] = {n: [] for n in self.saes}
        self._auto_pos: torch.Tensor | None = None
        self._auto_ids: torch.Tensor | None = None
        self._handles: list[Any] = []

    @contextlib.contextmanager
    def batch(self, rows: Sequence[RowSpec] | None = None, positions: torch.Tensor | None = None,
              token_ids: torch.Tensor | None = None, top_k: int | None = None) -> Iterator["Splice"]:
        """Forwards inside this context use these rows, positions, ids and top-k. `rows` are not checked here (a
        step's context must not re-check what was admitted once): check them once with `check_rows`, as a
        serving engine does on admission and `Splice(rows=...)` / `splice(rows=...)` do."""
        if top_k is not None and top_k < 0:
            raise SpliceError(f"top_k must be >= 0, got {top_k}")
        previous, self._batch = self._batch, Batch(rows, positions, token_ids, top_k)
        try:
            yield self
        finally:
            self._batch = previous

    # ---- hooks ---------------------------------------------------------------------------------
    def install(self) -> "Splice":
        if self._handles:
            return self
        layers = decoder_layers(self.model)
        self._handles.append(backbone(self.model).register_forward_pre_hook(self._track_positions, with_kwargs=True))
        for s in self.saes.values():
            layer = layers[s.hook.layer]
            if s.hook.kind == "post":
                self._handles.append(layer.register_forward_hook(self._post_hook(s)))
            else:
                self._handles.append(layer.register_forward_pre_hook(self._pre_hook(s), with_kwargs=True))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._auto_pos = self._auto_ids = None

    def __enter__(self) -> "Splice":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _post_hook(self, s: LoadedSAE):
        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            if isinstance(output, tuple):
                return (self._apply(s, output[0]), *output[1:])
            return self._apply(s, output)
        return hook

    def _pre_hook(self, s: LoadedSAE):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
            if args:
                return (self._apply(s, args[0]), *args[1:]), kwargs
            kwargs = dict(kwargs, hidden_states=self._apply(s, kwargs["hidden_states"]))
            return args, kwargs
        return hook

    def _track_positions(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Derive each token's position in its row from attention_mask or the KV-cache length."""
        ids = args[0] if args else kwargs.get("input_ids")
        self._auto_ids = ids
        t = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            pos = mask.long().cumsum(-1) - 1
            self._auto_pos = pos.masked_fill(mask == 0, -1)[:, -t:]
            return
        past = kwargs.get("past_key_values")
        start = int(past.get_seq_length()) if past is not None and hasattr(past, "get_seq_length") else 0
        device = ids.device if ids is not None else kwargs["inputs_embeds"].device
        self._auto_pos = torch.arange(start, start + t, device=device)[None, :]

    def _ids(self, b: int, t: int) -> torch.Tensor | None:
        ids = self._batch.token_ids if self._batch.token_ids is not None else self._auto_ids
        if ids is None or ids.dim() != 2 or ids.shape[-1] != t or ids.shape[0] not in (1, b):
            return None
        return ids

    def _apply(self, s: LoadedSAE, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        bt = self._batch
        pos = fit_positions(bt.positions if bt.positions is not None else self._auto_pos, b, t, x.device)
        res = splice_sae(s, x, pos, self._ids(b, t), bt.rows, mode=self.mode,
                         top_k=self.top_k if bt.top_k is None else bt.top_k, dense=self.dense,
                         stats=self.stats_enabled)
        if res.capture is not None:
            self._captures[s.name].append(res.capture)
        if res.dense is not None:
            self._dense[s.name].append(res.dense)
        if res.stats is not None:
            self._stats[s.name].append(res.stats)
        if res.stops is not None:
            self._stops[s.name].append(res.stops)
        return res.out

    # ---- what was recorded -----------------------------------------------------------------------
    def pop_stats(self) -> dict[str, list[SpliceStats]]:
        """Per SAE, one `SpliceStats` per forward since the last call."""
        out, self._stats = self._stats, {n: [] for n in self.saes}
        return out

    def pop_captures(self) -> dict[str, list[Capture]]:
        """Captured top-k latents since the last call, per SAE, one `Capture` per forward."""
        out, self._captures = self._captures, {n: [] for n in self.saes}
        return out

    def pop_stops(self) -> torch.Tensor | None:
        """(B, T) bool over the last forward: a row's stop condition (`RowSpec.stops`) holds there, on any SAE;
        None when no row watched any. Clears what was recorded."""
        hits = [per[-1] for per in self._stops.values() if per]
        self._stops = {n: [] for n in self.saes}
        return torch.stack(hits).any(0) if hits else None

    def pop_dense(self) -> dict[str, list[torch.Tensor]]:
        """Captured dense latents (B, T, d_sae) since the last call, per SAE, one tensor per forward."""
        out, self._dense = self._dense, {n: [] for n in self.saes}
        return out


@contextlib.contextmanager
def splice(model: torch.nn.Module, saes: Sequence[LoadedSAE], mode: str = TRAIN_MODE, *, top_k: int = 0,
           dense: bool = False, stats: bool = False,
           rows: Sequence[RowSpec] | None = None) -> Iterator[Splice]:
    """Context manager: SAEs spliced into `model`; hooks are removed on exit, also after an exception."""
    sp = Splice(model, saes, mode=mode, top_k=top_k, dense=dense, stats=stats, rows=rows).install()
    try:
        yield sp
    finally:
        sp.remove()
