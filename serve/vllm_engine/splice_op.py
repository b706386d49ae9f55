"""`torch.ops.saelora.splice`: the SAE splice as one opaque op, so vLLM can compile the model around it.

A spliced decoder layer calls the op on every forward, whatever the batch asks for. Compilers see one node with a
known output shape (the fake implementation) and never trace into it:

- `torch.compile(fullgraph=True)` and vLLM's own compilation (`DYNAMO_TRACE_ONCE` on CPU, which drops guards and
  traces once) compile the model with no graph break. Python decisions taken per batch (which rows need the SAE,
  their edits, conditions, top-k) happen inside the op at run time, never frozen at trace time.
- With piecewise CUDA graphs the op is a splitting op (`SPLITTING_OPS`), like vLLM's attention: the pieces between
  splice points are captured and replayed, the splice itself runs eagerly between them with the batch's real
  layout. This is vLLM's own answer for per-batch work that a graph cannot freeze.

The op returns a new stream (never an alias of its input): `x` unchanged when no row in the batch needs the SAE,
else `x` with the spliced rows replaced. Its runtime (the SAEs and the per-request settings) is found by an integer
handed out by `register_runtime` (an int, not a string: string arguments stop Inductor reusing piecewise graphs).
"""

from __future__ import annotations

import itertools
from typing import Protocol

import torch

NAMESPACE = "saelora"
OP = f"{NAMESPACE}::splice"


class Runtime(Protocol):
    sae_names: list[str]

    def __call__(self, name: str, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None: ...


_RUNTIMES: dict[int, Runtime] = {}
_NEXT = itertools.count()


def register_runtime(runtime: Runtime) -> int:
    """Make `runtime` reachable from the op; returns its handle."""
    handle = next(_NEXT)
    _RUNTIMES[handle] = runtime
    return handle


@torch.library.custom_op(OP, mutates_args=())
def splice(x: torch.Tensor, positions: torch.Tensor, runtime: int, sae: int) -> torch.Tensor:
    """x: (N, d) residual stream of vLLM's flat batch at the hook of SAE number `sae`; positions: (N,)."""
    rt = _RUNTIMES[runtime]
    y = rt(rt.sae_names[sae], x, positions)
    return x.clone() if y is None else y


@splice.register_fake
def _(x: torch.Tensor, positions: torch.Tensor, runtime: int, sae: int) -> torch.Tensor:
    return torch.empty_like(x)


SPLITTING_OPS = [OP]  # for vLLM's compilation_config.splitting_ops, beside its attention ops
