"""Per-row LoRA in one op pair per projection, whatever the batch's mix of adapters, for the torch engine.

PEFT's mixed batch (`adapter_names=[...]`) costs twice over on CPU. Every forward walks all modules to register
and remove a pre-hook on each LoRA layer (~20 ms a decode step of the embedded model, measured with cProfile).
Then, per adapter and per projection, it gathers the sub-batch, runs two matmuls and scatters the result back;
the dispatch of those small ops is the cost, not their FLOPs.

Here the engine names each row's adapter once per forward (`with lora.rows(names): model(...)`, no
`adapter_names`), and every LoRA linear layer computes

    y = base(x) + linear(linear(x, A_cat) * mask, B_cat)     x: (B, T, d), A_cat: (R, d), B_cat: (o, R), mask: (B, 1, R)

with A_cat the A matrices of the adapters present in the batch stacked (R = the sum of their ranks), B_cat their
B matrices side by side with each scale folded in, and mask keeping each row's own adapter's columns (zero for
`__base__` rows; no mask when every row has the one adapter present). It is two plain matmuls that read each
adapter's weights once: a batch of four adapters costs what a batch of one does, plus a few thousand FLOPs per
token. (The first version gathered per-row stacks for `bmm`/`baddbmm`: the same work, but CPU batched matmuls
of this size cost ~55 µs each. Running the two LoRA matmuls on prepacked oneDNN copies, as the base layers are
(packed.py), measured slower: 0.66 of the base step against 0.75.) The stacks are cached per module for the
batch's adapter tuple, so a decode step reuses the last one, and dropped whenever an adapter is attached or
detached. Outside `rows(...)`, or for anything but vanilla LoRA (the bundle allow-list admits nothing else),
PEFT's own forward runs. In fp64 the result equals PEFT's within 1e-10
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

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if self._all_base and not args and not kwargs:  # base rows only (plain requests): the base layer's
                # own op, without a second module call (the wrapper cost ~5% of a decode step otherwise)
                if linear and not (base_layer._forward_hooks or base_layer._forward_pre_hooks):
                    return packed.linear(base_layer, x)  # F.linear, or the engine's prepacked weights
                return base_layer(x)
            names = self._rows
            if names is None or "adapter_names" in kwargs or x.dim() != 3 or x.shape[0] != len(names) \
                    or module.lora_variant or module.merged or module.disable_adapters \
                    or any(n != BASE and n not in module.lora_A for n in names):
                return peft_forward(x, *args, **kwargs)
            base = linear and not args and not kwargs and not (base_layer._forward_hooks
                                                               or base_layer._forward_pre_hooks)
            result = packed.linear(base_layer, x) if base else base_layer(x, *args, **kwargs)
            if all(n == BASE for n in names):
                return result
            a, b, mask = self._stack(module, names, x.dtype)
            h = F.linear(x, a)  # (B, T, sum of the present adapters' ranks)
            return result.add_(F.linear(h if mask is None else h * mask, b))
        return forward

    def _stack(self, module: Any, names: tuple[str, ...], dtype: torch.dtype):  # noqa: ANN202
        """The present adapters' A concatenated (sum r, in), their B side by side with the scale folded in
        (out, sum r), and a (B, 1, sum r) 0/1 mask of each row's own adapter's columns (None: every row has the
        one adapter present)."""
        cached = self._stacks.get(id(module))
        if cached is not None and cached[0] == names:
            return cached[1:]
        present = list(dict.fromkeys(n for n in names if n != BASE))
        a = torch.cat([module.lora_A[n].weight.detach() for n in present]).to(dtype)
        b = torch.cat([module.lora_B[n].weight.detach() * module.scaling[n] for n in present], 1).to(dtype)
        mask = None
        if len(present) > 1 or BASE in names:
            mask = torch.zeros(len(names), 1, a.shape[0], dtype=dtype, device=a.device)
            start = {}
            for n in present:
                start[n] = sum(module.lora_A[m].weight.shape[0] for m in present[:present.index(n)])
            for i, n in enumerate(names):
                if n != BASE:
                    mask[i, :, start[n]:start[n] + module.lora_A[n].weight.shape[0]] = 1
        self._stacks[id(module)] = (names, a, b, mask)
        return a, b, mask
