"""The torch engine's LoRA: adapters held beside the base linear layers, per-row in one op pair per projection.

PEFT's serving path costs three times over on CPU. Loading an adapter (`inject_adapter`) walks every module of
the model for each of ~600 keys and builds 420 `nn.Linear`s: ~0.3 s for a rank-16 all-linear adapter on the
embedded model, 0.6 s for the first one, which wraps the model (cProfile). Its mixed batch
(`adapter_names=[...]`) registers and removes a pre-hook on every LoRA layer each forward (~20 ms a decode
step). And per adapter and per projection it gathers the sub-batch, runs two matmuls and scatters back.

So the engine keeps no PEFT model. `lora_weights` (adapters/bundle.py) reads a bundle into each target module's
A (r, in) and B (out, r) with PEFT's scale folded in, resolving targets, rank and alpha patterns with PEFT's own
functions. `ServedLoRA.attach` puts them beside the module, which stays an `nn.Linear` with an instance forward
(its name, weight, hooks and fingerprint unchanged), and the engine names each row's adapter once per forward
(`with lora.rows(names): model(...)`). Every adapted linear layer then computes

    y = base(x) + bmm(bmm(x, A_rows), B_rows)        x: (B, T, d), A_rows: (B, d, r), B_rows: (B, r, o)

as two ops, from stacks of each row's A and B (zero for `__base__` rows and for adapters that do not reach this
module, zero-padded to the largest rank). When every row uses the same adapter, the two ops are plain matmuls on
that adapter's own A and B (`addmm_(y, x @ A, B)`), which reads them once instead of once per row. A and B are
kept transposed from PEFT's layout (row-major for the matmul): ~11 µs a projection at 4 rows on the embedded
model's shapes, against ~20 µs for `y.add_(linear(linear(x, A), B))` (a throwaway microbenchmark). The
stacks are cached per module for the batch's adapter tuple, so a decode step reuses the last one. Outside
`rows(...)` a layer is its base layer. Detaching an adapter's last module gives the layer back its own forward,
so a server whose adapters are gone runs exactly the model it started with. In fp64 the result equals PEFT's
mixed batch within 1e-10 (tests/serve/test_engine_parts.py); in fp32 the two differ by kernel rounding.

Tried and not kept (bench/serve.py, torch engine): one pair of plain matmuls for mixed batches too, over the
present adapters' A stacked and B side by side with a 0/1 column mask per row: mixed_adapters 1.20 against
0.97 with the per-row stacks; and the LoRA matmuls on prepacked oneDNN copies like the base layers (packed.py):
0.66 of a base decode step against 0.75 in-process.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Sequence

import torch

from saelora.adapters.bundle import LoRAWeights

from ..core import packed

BASE = "__base__"


class _Layer:
    """One linear module with adapters beside it: each adapter's (A, scaled B), and the last batch's stacks."""

    def __init__(self, module: torch.nn.Linear) -> None:
        self.module = module
        self.adapters: dict[str, LoRAWeights] = {}
        self.cached: tuple[tuple[str, ...], tuple[torch.Tensor, torch.Tensor] | None] | None = None

    def stacks(self, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every row on one adapter: its A (in, r) and scaled B (r, out). Otherwise each row's A (B, in, r) and
        scaled B (B, r, out), zero for rows whose adapter is not on this layer. None: no row's adapter is."""
        if self.cached is not None and self.cached[0] == names:
            return self.cached[1]
        present = [n for n in names if n in self.adapters]
        if not present:
            got = None
        elif len(present) == len(names) and len(set(present)) == 1:
            w = self.adapters[present[0]]
            got = (w.a, w.b)
        else:
            rank = max(self.adapters[n].rank for n in present)
            w = self.module.weight
            a = torch.zeros(len(names), self.module.in_features, rank, dtype=w.dtype)
            b = torch.zeros(len(names), rank, self.module.out_features, dtype=w.dtype)
            for i, n in enumerate(names):
                if n in self.adapters:
                    lw = self.adapters[n]
                    a[i, :, :lw.rank] = lw.a
                    b[i, :lw.rank] = lw.b
            got = (a, b)
        self.cached = (names, got)
        return got


class ServedLoRA:
    """The adapters of one model, by name: `attach` / `detach` between forwards, `rows(names)` around one."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.modules = dict(model.named_modules())
        self.layers: dict[str, _Layer] = {}
        self._rows: tuple[str, ...] | None = None

    def attach(self, name: str, weights: Mapping[str, LoRAWeights]) -> None:
        """Adapter `name`: `weights[path]` beside the linear module at `path`, for each path."""
        if name == BASE or any(name in layer.adapters for layer in self.layers.values()):
            raise ValueError(f"adapter name {name!r} is reserved or already attached")
        wrong = [p for p in weights if type(self.modules.get(p)) is not torch.nn.Linear]
        if wrong:  # checked before anything changes: an adapter is attached whole or not at all
            raise ValueError(f"not linear modules of the model: {wrong}")
        for path, w in weights.items():
            layer = self.layers.get(path) or self._install(path)
            layer.adapters[name] = w
            layer.cached = None

    def detach(self, name: str) -> None:
        for path, layer in list(self.layers.items()):
            if layer.adapters.pop(name, None) is not None:
                layer.cached = None
                if not layer.adapters:
                    packed.reset_forward(layer.module)  # its own forward again: the model as it started
                    del self.layers[path]

    @contextlib.contextmanager
    def rows(self, names: Sequence[str]) -> Iterator[None]:
        """Forwards inside use adapter names[i] (or `__base__`) for batch row i."""
        previous = self._rows
        self._rows = None if all(n == BASE for n in names) else tuple(names)
        try:
            yield
        finally:
            self._rows = previous

    def _install(self, path: str) -> _Layer:
        module = self.modules[path]
        layer = self.layers[path] = _Layer(module)

        def forward(x: torch.Tensor) -> torch.Tensor:
            y = packed.linear(module, x).contiguous()  # a no-op for the layer's own output
            names = self._rows
            if names is None:  # outside rows(), or base rows only (plain requests)
                return y
            if x.dim() != 3 or x.shape[0] != len(names):
                raise RuntimeError(f"{path}: input {tuple(x.shape)} does not have one row per adapter name "
                                   f"({len(names)})")
            ab = layer.stacks(names)
            if ab is None:
                return y
            a, b = ab
            if a.dim() == 2:  # one adapter, every row: two plain matmuls, the second accumulating onto y
                return y.view(-1, y.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]) @ a, b).view(y.shape)
            return torch.baddbmm(y, torch.bmm(x, a), b)
        module.forward = forward  # an instance forward: nn.Module.__call__ finds it, hooks still run
        return layer
