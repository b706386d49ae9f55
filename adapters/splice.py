"""The splice, as a pure function: one SAE applied to one residual-stream batch.

Per SAE (at hook h, residual x of shape (B, T, d)), with z = encode(x) of shape (B, T, d_sae) and
z' = z after this row's latent edits:

    replace     x <- decode(z')                          (the paper's training setting)
    error_term  x <- x + [edited] * (decode(z') - decode(z))
                 = decode(z') + (x - decode(z)) where edited, exactly x elsewhere
    off         x <- x                                   (latents can still be captured)

so `error_term` without edits is exactly the base model (the serving default for steering).
Every row of the batch has its own modes, edits and prompt length (`RowSpec`); the vocabulary of modes and
edits, and their checks, live in adapters/edits.py. Positions outside the SAE's position policy
(adapters/policy.py: padding at position -1, position 0 without BOS, BOS/EOS ids, massive activations) stay
exactly x in every mode, take no edit and are left out of the stats; the SAE computes in fp32 whatever the
model dtype.

`splice_sae` is the only place this math lives: the hooks that put it into a transformers model
(adapters/splice_hooks.py), the trainer through them, and the vLLM engine's layer wrappers all call it.

    res = splice_sae(sae, x, pos, ids, rows, mode="replace", top_k=8)
    res.out, res.capture, res.stats
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from .edits import (Condition, Edit, LatentEdit, Mode, SpliceError, SpliceNotFoundError, VectorEdit, apply_op,
                    changes_stream, check_condition, check_edit, check_mode, edit_from_json, position_mask)
from .saes import LoadedSAE

__all__ = ["Capture", "Condition", "Edit", "LatentEdit", "VectorEdit", "RowSpec", "SpliceError", "SpliceNotFoundError",
           "SpliceResult",
           "SpliceStats", "changes_stream", "check_edits", "check_rows", "fit_positions", "splice_sae"]


@dataclass
class RowSpec:
    """What one batch row gets: per-SAE mode overrides, latent and vector edits, its prompt length (tokens), and
    the conditions that end its generation (`stops`: reported per generated token, the stream is not touched).

    It is also the one request shape a serving engine receives (serve/core/engine.py `GenerationRequest.splice`):
    the API builds it, `check_request` checks it once on admission (and fills `prompt_len`), and the vLLM engine
    carries this same object into its worker (`to_json` once). The serving fields (`top_k`, `include_prompt`,
    `report`) are ignored by the hooks and the trainer."""

    modes: dict[str, Mode] = field(default_factory=dict)  # SAE -> mode; an SAE not named: the splice's default
    edits: list[Edit] = field(default_factory=list)
    prompt_len: int | None = None
    stops: list[Condition] = field(default_factory=list)
    top_k: int = 0  # latents per token and SAE to capture for this row (0: none)
    include_prompt: bool = False  # also the prompt's latents (one event before the first token)
    report: list[str] | None = None  # SAEs whose latents the row returns (None: all)

    def changes_stream(self, sae: str, default_mode: str) -> bool:
        """Whether the splice alters this row's residual stream at `sae` (else it only reads latents there)."""
        return changes_stream(self.modes.get(sae, default_mode), self.edits, sae)

    def needs(self, sae: str, default_mode: str) -> bool:
        """Whether SAE `sae` must run for this row at all: it changes the stream, captures or watches a stop."""
        return self.top_k > 0 or self.changes_stream(sae, default_mode) or any(c.sae == sae for c in self.stops)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types (the vLLM engine carries a row this way into its worker, across processes too)."""
        return {"modes": dict(self.modes), "edits": [e.to_json() for e in self.edits], "prompt_len": self.prompt_len,
                "stops": [c.to_json() for c in self.stops], "top_k": self.top_k,
                "include_prompt": self.include_prompt, "report": self.report}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RowSpec":
        n, report = data["prompt_len"], data["report"]
        return cls(modes=dict(data["modes"]), edits=[edit_from_json(e) for e in data["edits"]],
                   prompt_len=None if n is None else int(n), stops=[Condition.from_json(c) for c in data["stops"]],
                   top_k=int(data["top_k"]), include_prompt=bool(data["include_prompt"]),
                   report=None if report is None else [str(r) for r in report])


@dataclass
class Capture:
    """Top-k latents of one forward: indices/values (B, T, k) after edits, and each token's position (B, T)."""

    indices: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor


@dataclass
class SpliceStats:
    """Reconstruction statistics of one forward over the spliced positions (policy-kept ones excluded).

    sse: sum of squared reconstruction error (keeps its graph: usable as a training term); sst: sum of squared
    deviation from the batch mean; l0: sum over tokens of active latents; n: tokens counted; d: width."""

    sse: torch.Tensor
    sst: torch.Tensor
    l0: torch.Tensor
    n: torch.Tensor
    d: int

    def detach(self) -> "SpliceStats":
        return SpliceStats(self.sse.detach(), self.sst.detach(), self.l0.detach(), self.n.detach(), self.d)


@dataclass
class SpliceResult:
    """The new stream (x itself when nothing changed it), and what was asked to be recorded."""

    out: torch.Tensor
    capture: Capture | None = None
    dense: torch.Tensor | None = None  # (B, T, d_sae) latents after edits
    stats: SpliceStats | None = None
    stops: torch.Tensor | None = None  # (B, T) bool: a row's stop condition on this SAE holds at a generated token


def check_rows(saes: Mapping[str, LoadedSAE], rows: Sequence[RowSpec]) -> None:
    """Raise `SpliceError` for anything in `rows` that cannot be applied with these SAEs (keyed by name)."""
    sizes = {name: s.d_sae for name, s in saes.items()}
    widths = {name: s.d_in for name, s in saes.items()}
    for row in rows:
        for name, mode in row.modes.items():
            _d_sae(sizes, name)
            check_mode(mode)
        check_edits(sizes, row.edits, row.stops, widths)


def check_edits(sizes: Mapping[str, int], edits: Sequence[Edit], stops: Sequence[Condition] = (),
                widths: Mapping[str, int] | None = None) -> None:
    """Raise `SpliceError` unless every edit and stop condition fits SAEs of these widths (d_sae, and d_in for
    vector edits when `widths` is given, keyed by name); `SpliceNotFoundError` for an SAE or latent they lack."""
    for e in edits:
        if e.when is not None:
            _d_sae(sizes, e.when.sae)  # an SAE the server lacks is "not found" before "not supported"
        check_edit(e, _d_sae(sizes, e.sae), (widths or {}).get(e.sae))
    for c in stops:
        check_condition(c, _d_sae(sizes, c.sae))


def _d_sae(sizes: Mapping[str, int], name: str) -> int:
    if name not in sizes:
        raise SpliceNotFoundError(f"Unknown SAE {name!r}; spliced SAEs: {sorted(sizes)}")
    return sizes[name]


def fit_positions(pos: torch.Tensor | None, b: int, t: int, device: torch.device) -> torch.Tensor:
    """(B, T) positions from (1 or B, T) ones, or 0..T-1 when none are known; a shape that does not fit raises."""
    if pos is None:
        pos = torch.arange(t, device=device)[None, :]
    if pos.shape[-1] != t or pos.shape[0] not in (1, b):
        raise SpliceError(f"positions of shape {tuple(pos.shape)} do not fit a batch of ({b}, {t})")
    return pos.to(device).expand(b, t)


def splice_sae(s: LoadedSAE, x: torch.Tensor, pos: torch.Tensor, ids: torch.Tensor | None,
               rows: Sequence[RowSpec] | None, *, mode: str, top_k: int = 0, dense: bool = False,
               stats: bool = False) -> SpliceResult:
    """Splice SAE `s` into x (B, T, d) at positions pos (B, T; -1 = padding) with token ids (B, T) or None.

    `rows` (one per batch row, or None: `mode` and no edits for every row) are assumed checked (`check_rows`).
    Records the top-k latents when top_k > 0, the dense latents when `dense`, the stats when `stats`."""
    b = x.shape[0]
    modes = _row_modes(s.name, rows, mode, b)
    watch = any(c.sae == s.name for r in rows or [] for c in r.stops)
    if not (top_k > 0 or dense or stats or watch) and not _any_active(s.name, rows, modes):
        return SpliceResult(x)  # every row is off, or error_term without edits: the stream is exactly x
    keep = s.policy.keep_mask(pos, ids, x)  # (B, T): stays exactly x (padding, sinks, BOS/EOS)
    z = s.encode(x)  # (B, T, d_sae), fp32
    z_edit, edited = _edit_latents(s.name, z, pos, keep, rows)  # edited: (B, T) bool, or None
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
    if edited is not None:
        err = torch.tensor([m == "error_term" for m in modes], device=x.device)
        emask = edited & err[:, None]  # (B, T)
        if bool(emask.any()):
            out = torch.where(emask[..., None], x + (recon(False) - recon(True)), out)
    out = _add_vectors(s.name, out, z, pos, keep, rows)
    if bool(keep.any()):
        out = torch.where(keep[..., None], x, out)
    return SpliceResult(out, capture=_capture(z_edit, pos, top_k) if top_k > 0 else None,
                        dense=z_edit.detach() if dense else None,
                        stats=_stats(x, z, recon(True), ~keep) if stats else None,
                        stops=_stops(s.name, z, pos, keep, rows) if watch else None)


def _row_modes(name: str, rows: Sequence[RowSpec] | None, mode: str, b: int) -> list[str]:
    if rows is None:
        return [mode] * b
    if len(rows) != b:
        raise SpliceError(f"{len(rows)} row specs for a batch of {b} rows")
    return [r.modes.get(name, mode) for r in rows]


def _any_active(name: str, rows: Sequence[RowSpec] | None, modes: list[str]) -> bool:
    rows = rows if rows is not None else [RowSpec()] * len(modes)
    return any(changes_stream(m, r.edits, name) for m, r in zip(modes, rows, strict=True))


def _edit_latents(name: str, z: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor,
                  rows: Sequence[RowSpec] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not rows or not any(e.sae == name and isinstance(e, LatentEdit) for r in rows for e in r.edits):
        return z, None
    z0, z = z, z.clone()  # conditions read z0: the latents before any edit
    edited = torch.zeros(pos.shape, dtype=torch.bool, device=z.device)
    for r, row in enumerate(rows):
        for e in row.edits:
            if e.sae != name or not isinstance(e, LatentEdit):
                continue
            m = _edit_mask(e, z0[r], pos[r], keep[r], row.prompt_len)
            if not bool(m.any()):
                continue
            col = z[r, :, e.feature]
            z[r, :, e.feature] = torch.where(m, apply_op(e.op, col, e.value), col)
            edited[r] |= m
    return z, edited


def _edit_mask(e: Edit, z0: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor,
               prompt_len: int | None) -> torch.Tensor:
    """(T,) bool: where edit `e` applies in one row (its positions, not policy-kept, its condition on z0 (T, S))."""
    m = position_mask(e.positions, pos, prompt_len) & ~keep
    return m & (z0[:, e.when.feature] > e.when.above) if e.when is not None else m


def _add_vectors(name: str, out: torch.Tensor, z: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor,
                 rows: Sequence[RowSpec] | None) -> torch.Tensor:
    """out after the rows' vector edits at this SAE: add (out += value v) or project (out += value (out.v^) v^)."""
    if not rows or not any(e.sae == name and isinstance(e, VectorEdit) for r in rows for e in r.edits):
        return out
    out = out.clone()
    for r, row in enumerate(rows):
        for e in row.edits:
            if e.sae != name or not isinstance(e, VectorEdit):
                continue
            m = _edit_mask(e, z[r], pos[r], keep[r], row.prompt_len)[:, None]  # (T, 1)
            v = out.new_tensor(e.vector)  # (d,)
            if e.op == "add":
                delta = e.value * v
            else:  # an all-zero direction projects to nothing (0 / 1e-30 = 0), with no host sync to check it
                u = v / v.norm().clamp_min(1e-30)
                delta = e.value * (out[r].float() @ u.float()).to(out.dtype)[:, None] * u
            out[r] = torch.where(m, out[r] + delta, out[r])
    return out


def _stops(name: str, z: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor,
           rows: Sequence[RowSpec]) -> torch.Tensor:
    """(B, T) bool: for each row, whether any of its stop conditions on this SAE holds at a generated token."""
    hit = torch.zeros(pos.shape, dtype=torch.bool, device=z.device)
    for r, row in enumerate(rows):
        for c in row.stops:
            if c.sae == name:
                hit[r] |= position_mask("generated", pos[r], row.prompt_len) & ~keep[r] & (z[r, :, c.feature] > c.above)
    return hit


def _capture(z: torch.Tensor, pos: torch.Tensor, top_k: int) -> Capture:
    values, indices = z.detach().topk(min(top_k, z.shape[-1]), dim=-1)
    return Capture(indices=indices, values=values, positions=pos.clone())


def _stats(x: torch.Tensor, z: torch.Tensor, recon: torch.Tensor, real: torch.Tensor) -> SpliceStats:
    """real (B, T): the spliced positions (under the policy, not padding); only they are counted."""
    xr, err = x[real].float(), (x - recon)[real].float()  # (n, d)
    return SpliceStats(sse=err.pow(2).sum(), sst=(xr - xr.mean(0, keepdim=True)).pow(2).sum().detach(),
                       l0=(z.detach()[real] > 0).sum(-1).float().sum(), n=real.sum(), d=int(x.shape[-1]))
