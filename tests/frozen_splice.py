"""FROZEN test-only copy of adapters/splice.py as of ddcb78a, kept to check the rewritten splice against it.

Per SAE (at hook h, residual x of shape (B, T, d)), with z = encode(x) of shape (B, T, d_sae) and
z' = z after this row's latent edits:

    replace     x <- decode(z')                          (the paper's training setting)
    error_term  x <- x + [edited] * (decode(z') - decode(z))
                 = decode(z') + (x - decode(z)) where edited, exactly x elsewhere
    off         x <- x                                   (latents can still be captured)

so `error_term` without edits is exactly the base model (the serving default for steering).
Every row of the batch has its own modes, edits and prompt length (`RowSpec`); the vocabulary of modes and
edits, and their checks, live in adapters/edits.py. Positions come from
`attention_mask` / the KV-cache length of each forward (pads get position -1 and are never
touched), or are set explicitly by an engine through `Splice.positions`; token ids come from the
forward's `input_ids` (or `Splice.token_ids`). Positions outside each SAE's position policy
(adapters/policy.py: position 0 without BOS, BOS/EOS ids, massive activations) stay exactly x in
every mode, take no edit and are left out of the stats; the SAE computes in fp32 whatever the model dtype.

    with splice(model, [sae], mode="replace", top_k=8) as sp:
        logits = model(input_ids).logits
        caps = sp.pop_captures()  # {sae_name: [Capture(indices (B,T,k), values (B,T,k), positions (B,T))]}
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from saelora.adapters.edits import (TRAIN_MODE, LatentEdit, SpliceError, apply_op, changes_stream, check_edit,
                                    check_mode,
                    position_mask)
from saelora.adapters.hooks import backbone, decoder_layers
from saelora.adapters.saes import LoadedSAE

__all__ = ["Capture", "LatentEdit", "RowSpec", "Splice", "SpliceError", "changes_stream", "splice"]

@dataclass
class RowSpec:
    """What one batch row gets: per-SAE mode overrides, latent edits, and its prompt length (tokens)."""

    modes: dict[str, str] = field(default_factory=dict)
    edits: list[LatentEdit] = field(default_factory=list)
    prompt_len: int | None = None


@dataclass
class Capture:
    """Top-k latents of one forward: indices/values (B, T, k) after edits, and each token's position (B, T)."""

    indices: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor


class Splice:
    """SAEs spliced into a model's residual stream; see the module docstring. Use as a context manager."""

    def __init__(self, model: torch.nn.Module, saes: Sequence[LoadedSAE], mode: str = TRAIN_MODE,
                 top_k: int = 0, dense: bool = False, stats: bool = False) -> None:
        names = [s.name for s in saes]
        hooks = [s.hook.name for s in saes]
        if len(set(names)) != len(names):
            raise SpliceError(f"SAE names must be unique, got {names}")
        if len(set(hooks)) != len(hooks):
            raise SpliceError(f"One SAE per hook point, got {hooks}")
        check_mode(mode)
        if top_k < 0:
            raise SpliceError(f"top_k must be >= 0, got {top_k}")
        self.model, self.saes = model, {s.name: s for s in saes}
        self.mode, self.top_k, self.dense = mode, top_k, dense
        self.stats_enabled = stats  # record L0 / reconstruction error per forward (see `pop_stats`)
        self.stats: dict[str, list[dict[str, torch.Tensor]]] = {n: [] for n in self.saes}
        self.rows: list[RowSpec] | None = None
        self.positions: torch.Tensor | None = None  # explicit (B, T) positions; overrides the automatic ones
        self.token_ids: torch.Tensor | None = None  # explicit (B, T) token ids, for the policy's kept ids
        self.captures: dict[str, list[Capture]] = {n: [] for n in self.saes}
        self.dense_latents: dict[str, list[torch.Tensor]] = {n: [] for n in self.saes}
        self._auto_pos: torch.Tensor | None = None
        self._auto_ids: torch.Tensor | None = None
        self._handles: list[Any] = []

    # ---- configuration -------------------------------------------------------------------------
    def set_rows(self, rows: Sequence[RowSpec] | None) -> None:
        """Give each batch row its modes, edits and prompt length (None: defaults for every row)."""
        if rows is not None:
            for row in rows:
                self.validate_row(row)
        self.rows = list(rows) if rows is not None else None

    def validate_row(self, row: RowSpec) -> None:
        """Raise `SpliceError` for anything in `row` that cannot be applied."""
        for name, mode in row.modes.items():
            self._sae(name)
            check_mode(mode)
        for e in row.edits:
            check_edit(e, self._sae(e.sae).d_sae)

    def _sae(self, name: str) -> LoadedSAE:
        if name not in self.saes:
            raise SpliceError(f"Unknown SAE {name!r}; spliced SAEs: {sorted(self.saes)}")
        return self.saes[name]

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
                return (self._splice(s, output[0]), *output[1:])
            return self._splice(s, output)
        return hook

    def _pre_hook(self, s: LoadedSAE):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
            if args:
                return (self._splice(s, args[0]), *args[1:]), kwargs
            kwargs = dict(kwargs, hidden_states=self._splice(s, kwargs["hidden_states"]))
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

    def _positions(self, b: int, t: int, device: torch.device) -> torch.Tensor:
        pos = self.positions if self.positions is not None else self._auto_pos
        if pos is None:
            pos = torch.arange(t, device=device)[None, :]
        if pos.shape[-1] != t or pos.shape[0] not in (1, b):
            raise SpliceError(f"positions of shape {tuple(pos.shape)} do not fit a batch of ({b}, {t})")
        return pos.to(device).expand(b, t)

    def _ids(self, b: int, t: int) -> torch.Tensor | None:
        ids = self.token_ids if self.token_ids is not None else self._auto_ids
        if ids is None or ids.dim() != 2 or ids.shape[-1] != t or ids.shape[0] not in (1, b):
            return None
        return ids

    # ---- the splice itself ---------------------------------------------------------------------
    def apply(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Splice SAE `name` into x (B, T, d) under the current rows, positions and top_k, without hooks:
        for engines that call the splice from their own layer wrappers (the vLLM engine). Returns x itself
        when nothing changes the stream."""
        return self._splice(self._sae(name), x)

    def _row_modes(self, name: str, b: int) -> list[str]:
        if self.rows is None:
            return [self.mode] * b
        if len(self.rows) != b:
            raise SpliceError(f"{len(self.rows)} row specs for a batch of {b} rows")
        return [r.modes.get(name, self.mode) for r in self.rows]

    def _splice(self, s: LoadedSAE, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape  # x: (B, T, d) residual stream at the hook
        modes = self._row_modes(s.name, b)
        capture = self.top_k > 0 or self.dense
        if not capture and not self.stats_enabled and not self._any_active(s.name, modes):
            return x  # every row is off, or error_term without edits: the stream is exactly x
        pos = self._positions(b, t, x.device)  # (B, T), -1 = padding
        keep = s.policy.keep_mask(pos, self._ids(b, t), x)  # (B, T): stays exactly x (padding, sinks, BOS/EOS)
        z = s.encode(x)  # (B, T, d_sae), fp32
        z_edit, edited = self._edit_latents(s.name, z, pos, keep)  # edited: (B, T) bool, or None
        if capture:
            self._record(s.name, z_edit, pos)
        decoded: dict[bool, torch.Tensor] = {}

        def recon(clean: bool) -> torch.Tensor:  # (B, T, d), each reconstruction decoded at most once
            clean = clean or edited is None  # without edits z' is z
            if clean not in decoded:
                decoded[clean] = s.decode(z if clean else z_edit, x)
            return decoded[clean]

        out = x
        replace = torch.tensor([m == "replace" for m in modes], device=x.device)
        if bool(replace.any()):
            out = recon(False) if bool(replace.all()) else torch.where(replace[:, None, None], recon(False), out)
        if self.stats_enabled:
            self._record_stats(s.name, x, z, recon(True), ~keep)
        if edited is not None:
            err = torch.tensor([m == "error_term" for m in modes], device=x.device)
            emask = edited & err[:, None]  # (B, T)
            if bool(emask.any()):
                out = torch.where(emask[..., None], x + (recon(False) - recon(True)), out)
        if bool(keep.any()):
            out = torch.where(keep[..., None], x, out)
        return out

    def _any_active(self, name: str, modes: list[str]) -> bool:
        rows = self.rows if self.rows is not None else [RowSpec()] * len(modes)
        return any(changes_stream(m, r.edits, name) for m, r in zip(modes, rows, strict=True))

    def _edit_latents(self, name: str, z: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor):
        if not self.rows or not any(e.sae == name for r in self.rows for e in r.edits):
            return z, None
        z = z.clone()
        edited = torch.zeros(pos.shape, dtype=torch.bool, device=z.device)
        for r, row in enumerate(self.rows):
            for e in row.edits:
                if e.sae != name:
                    continue
                m = position_mask(e.positions, pos[r], row.prompt_len) & ~keep[r]  # (T,)
                if not bool(m.any()):
                    continue
                col = z[r, :, e.feature]
                z[r, :, e.feature] = torch.where(m, apply_op(e.op, col, e.value), col)
                edited[r] |= m
        return z, edited

    def _record(self, name: str, z: torch.Tensor, pos: torch.Tensor) -> None:
        z = z.detach()
        if self.top_k > 0:
            values, indices = z.topk(min(self.top_k, z.shape[-1]), dim=-1)
            self.captures[name].append(Capture(indices=indices, values=values, positions=pos.clone()))
        if self.dense:
            self.dense_latents[name].append(z)

    def _record_stats(self, name: str, x: torch.Tensor, z: torch.Tensor, recon: torch.Tensor,
                      real: torch.Tensor) -> None:
        """real (B, T): the spliced positions (under the policy, not padding); only they are counted."""
        xr, err = x[real].float(), (x - recon)[real].float()  # (n, d)
        self.stats[name].append({
            "sse": err.pow(2).sum(),  # keeps its graph: usable as a training term
            "sst": (xr - xr.mean(0, keepdim=True)).pow(2).sum().detach(),
            "l0": (z.detach()[real] > 0).sum(-1).float().sum(),
            "n": real.sum(), "d": torch.tensor(x.shape[-1]),
        })

    def pop_stats(self) -> dict[str, list[dict[str, torch.Tensor]]]:
        """Per SAE, one dict per forward: sse (sum of squared reconstruction error, with grad), sst (sum of
        squared deviation from the batch mean), l0 (sum over tokens of active latents), n (tokens), d."""
        out = self.stats
        self.stats = {n: [] for n in self.saes}
        return out

    def pop_captures(self) -> dict[str, list[Capture]]:
        """Captured top-k latents since the last call, per SAE, one `Capture` per forward."""
        out = self.captures
        self.captures = {n: [] for n in self.saes}
        return out

    def pop_dense(self) -> dict[str, list[torch.Tensor]]:
        """Captured dense latents (B, T, d_sae) since the last call, per SAE, one tensor per forward."""
        out = self.dense_latents
        self.dense_latents = {n: [] for n in self.saes}
        return out


@contextlib.contextmanager
def splice(model: torch.nn.Module, saes: Sequence[LoadedSAE], mode: str = TRAIN_MODE, *, top_k: int = 0,
           dense: bool = False, stats: bool = False,
           rows: Sequence[RowSpec] | None = None) -> Iterator[Splice]:
    """Context manager: SAEs spliced into `model`; hooks are removed on exit, also after an exception."""
    sp = Splice(model, saes, mode=mode, top_k=top_k, dense=dense, stats=stats)
    sp.set_rows(rows)
    sp.install()
    try:
        yield sp
    finally:
        sp.remove()
