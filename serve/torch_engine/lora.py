"""Per-row LoRA in one op pair per projection, whatever the batch's mix of adapters, for the torch engine.

PEFT's mixed batch (`adapter_names=[...]`) costs twice over on CPU. Every forward walks all modules to register
and remove a pre-hook on each LoRA layer (~20 ms a decode step of the embedded model, measured with cProfile).
Then, per adapter and per projection, it gathers the sub-batch, runs two matmuls and scatters the result back;
the dispatch of those small ops is the cost, not their FLOPs.

Here the engine names each row's adapter once per forward (`with lora.rows(names): model(...)`, no
`adapter_names`), and every LoRA linear layer computes

    y = base(x) + bmm(bmm(x, A_rows), B_rows)        x: (B, T, d), A_rows: (B, d, r), B_rows: (B, r, o)

as two ops (`bmm`, then `baddbmm` onto the base output), from stacks of each row's A and B (zero for
`__base__` rows, zero-padded to the largest rank, the scale folded into B). When every row uses the same
adapter, the two ops are plain matmuls on that adapter's own A and B (`linear(linear(x, A), B)`), which reads
them once instead of once per row. Tried and not kept (bench/serve.py, torch engine): one pair of plain matmuls
for mixed batches too, over the present adapters' A stacked and B side by side with a 0/1 column mask per row
(the same bytes, one op more): mixed_adapters 1.20 against 0.97 with the per-row stacks; and the LoRA matmuls
on prepacked oneDNN copies like the base layers (packed.py): 0.66 of a base decode step against 0.75 in-process.
The stacks are cached per module for the batch's adapter tuple, so a decode step reuses the last one, and
dropped whenever an adapter is attached or detached. Outside `rows(...)`, or for anything but vanilla LoRA (the
bundle allow-list admits nothing else), PEFT's own forward runs. In fp64 the result equals PEFT's within 1e-10
(tests/serve/test_engine_parts.py); in fp32 the two differ by kernel rounding.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from . import packed

BASE = "__base__"


class GatheredLoRA:
    """Installs the gathered forward on every LoRA linear layer of a PEFT model; `invalidate()` after any
    adapter change; `rows(names)` around a forward."""

    def __init__(self) -> None:
        self._stacks: dict[int, tuple[tuple[str, ...], torch.Tensor, torch.Tensor]] = {}
        self._rows: tuple[str, ...] | None = None
        self._all_base = False  # every row of the current forward is `__base__`: the base layer alone

    def install(self, model: torch.nn.Module) -> None:
        from peft.tuners.lora.layer import Linear as LoraLinear

        self._stacks.clear()
        for module in model.modules():
            if isinstance(module, LoraLinear) and "forward" not in vars(module):
                module.forward = self._forward_of(module)  # bound to this module; nn.Module.__call__ finds it

    def invalidate(self) -> None:
        self._stacks.clear()

    @contextlib.contextmanager
    def rows(self, names: Sequence[str]) -> Iterator[None]:
        """Forwards inside use adapter names[i] (or `__base__`) for batch row i."""
        previous = self._rows, self._all_base
        self._rows, self._all_base = tuple(names), all(n == BASE for n in names)
        try:
            yield
        finally:
            self._rows, self._all_base = previous

    def _forward_of(self, module: Any):  # noqa: ANN202
        peft_forward = type(module).forward.__get__(module)

        base_layer = module.base_layer
        linear = type(base_layer) is torch.nn.Linear

        def base(x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
            """The base layer's output; for a plain linear, its op without a second module call (the wrapper
            cost ~5% of a decode step otherwise): F.linear, or the engine's prepacked weights."""
            if linear and not args and not kwargs and not (base_layer._forward_hooks or base_layer._forward_pre_hooks):
                return packed.linear(base_layer, x)
            return base_layer(x, *args, **kwargs)

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if self._all_base and not args and not kwargs:  # base rows only (plain requests)
                return base(x, args, kwargs)
            names = self._rows
            if names is None or "adapter_names" in kwargs or x.dim() != 3 or x.shape[0] != len(names) \
                    or module.lora_variant or module.merged or module.disable_adapters \
                    or any(n != BASE and n not in module.lora_A for n in names):
                return peft_forward(x, *args, **kwargs)
            result = base(x, args, kwargs)
            if self._all_base:
                return result
            a, b = self._stack(module, names, x.dtype)
            if a.dim() == 2:  # one adapter, every row: two plain matmuls
                return result.add_(F.linear(F.linear(x, a), b))
            return torch.baddbmm(result, torch.bmm(x, a), b)
        return forward

    def _stack(self, module: Any, names: tuple[str, ...], dtype: torch.dtype):  # noqa: ANN202
        """Every row on one adapter: its A (r, in) and its B with the scale folded in (out, r). Otherwise each
        row's A (B, in, r) and scaled B (B, r, out), zero for `__base__` rows, zero-padded to the largest rank."""
        cached = self._stacks.get(id(module))
        if cached is not None and cached[0] == names:
            return cached[1:]
        if BASE not in names and len(set(names)) == 1:
            n = names[0]
            a = module.lora_A[n].weight.detach().to(dtype)
            b = (module.lora_B[n].weight.detach() * module.scaling[n]).to(dtype)
        else:
            present = [n for n in names if n != BASE]
            rank = max(module.lora_A[n].weight.shape[0] for n in present)
            w = module.lora_A[present[0]].weight
            a = torch.zeros(len(names), module.in_features, rank, dtype=dtype, device=w.device)
            b = torch.zeros(len(names), rank, module.out_features, dtype=dtype, device=w.device)
            for i, n in enumerate(names):
                if n != BASE:
                    r = module.lora_A[n].weight.shape[0]
                    a[i, :, :r] = module.lora_A[n].weight.detach().T
                    b[i, :r] = module.lora_B[n].weight.detach().T * module.scaling[n]
        self._stacks[id(module)] = (names, a, b)
        return a, b
