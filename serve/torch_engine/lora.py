"""Per-row LoRA in one batched op per projection (bgmv style), for the torch engine's mixed-adapter batches.

PEFT's mixed batch (`adapter_names=[...]`) loops over the adapters present: per adapter and per projection it
gathers the sub-batch, runs two matmuls and scatters the result back, so a step with k adapters runs ~5k small
ops per projection, and on CPU the dispatch of those ops, not their FLOPs, is the cost. Here each row's A and
B are stacked once per batch composition (zero for `__base__` rows, zero-padded to the largest rank) and every
projection does

    y = base(x) + bmm(bmm(x, A_rows), B_rows) * scale_rows          x: (B, T, d), A_rows: (B, d, r), B_rows: (B, r, o)

The stacks are cached per module for the batch's adapter tuple (a decode step reuses the last one) and
dropped whenever an adapter is attached or detached. Only vanilla LoRA on linear layers takes this path (the
bundle allow-list admits nothing else); anything else falls back to PEFT's own.
"""

from __future__ import annotations

from typing import Any

import torch

BASE = "__base__"


class GatheredLoRA:
    """Installs the gathered forward on every LoRA linear layer of a PEFT model; `invalidate()` after any
    adapter change."""

    def __init__(self) -> None:
        self._stacks: dict[int, tuple[tuple[str, ...], torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def install(self, model: torch.nn.Module) -> None:
        from peft.tuners.lora.layer import Linear as LoraLinear

        self._stacks.clear()
        for module in model.modules():
            if isinstance(module, LoraLinear) and "_mixed_batch_forward" not in vars(module):
                module._mixed_batch_forward = self._forward_of(module)  # bound to this module (PEFT calls it)

    def invalidate(self) -> None:
        self._stacks.clear()

    def _forward_of(self, module: Any):  # noqa: ANN202
        from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

        peft_forward = type(module)._mixed_batch_forward.__get__(module)

        def forward(x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any) -> torch.Tensor:
            if x.dim() != 3 or module.lora_variant or any(n != BASE and n not in module.lora_A for n in adapter_names):
                return peft_forward(x, *args, adapter_names=adapter_names, **kwargs)
            if any(kwargs.pop(k, None) is not None for k in VARIANT_KWARG_KEYS):
                raise ValueError("LoRA variants (aLoRA offsets) are not served")
            result = module.base_layer(x, *args, **kwargs)
            if all(n == BASE for n in adapter_names):
                return result
            a, b, scale = self._stack(module, tuple(adapter_names), x.dtype)
            return result + (torch.bmm(torch.bmm(x, a), b) * scale).to(result.dtype)
        return forward

    def _stack(self, module: Any, names: tuple[str, ...], dtype: torch.dtype):  # noqa: ANN202
        cached = self._stacks.get(id(module))
        if cached is not None and cached[0] == names:
            return cached[1:]
        present = [n for n in names if n != BASE]
        rank = max(module.lora_A[n].weight.shape[0] for n in present)
        d_in, d_out = module.in_features, module.out_features
        w = module.lora_A[present[0]].weight
        a = torch.zeros(len(names), d_in, rank, dtype=dtype, device=w.device)
        b = torch.zeros(len(names), rank, d_out, dtype=dtype, device=w.device)
        scale = torch.zeros(len(names), 1, 1, dtype=dtype, device=w.device)
        for i, n in enumerate(names):
            if n != BASE:
                r = module.lora_A[n].weight.shape[0]
                a[i, :, :r] = module.lora_A[n].weight.detach().T
                b[i, :r] = module.lora_B[n].weight.detach().T
                scale[i] = module.scaling[n]
        self._stacks[id(module)] = (names, a, b, scale)
        return a, b, scale
