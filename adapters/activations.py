"""Running part of a model: up to a hook point (and stop), or from a hook point on.

`run_to_hook` returns the residual stream at a point without running the layers after it
(SAE training, encode-only feature requests, and the shared prefix of teacher and student).
`resume_from_hook` runs the rest of the model from a given residual stream: the layers before
the point become identities for the duration and the given tensor is injected at the point.
Injection hooks are prepended, so a `Splice` at the same point sees the injected tensor.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from .hooks import HookPoint, decoder_layers


class _Stop(Exception):
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x


def run_to_hook(model: torch.nn.Module, point: HookPoint, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, **model_kwargs: Any) -> torch.Tensor:
    """Residual stream (B, T, d) at `point`; the layers after it do not run. `model_kwargs` go to the forward
    (e.g. PEFT's `adapter_names`, or a KV cache with `use_cache=True`: then only the layers up to `point` add
    to it)."""
    layer = decoder_layers(model)[point.layer]

    def post(module: torch.nn.Module, args: Any, output: Any) -> None:
        raise _Stop(output[0] if isinstance(output, tuple) else output)

    def pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        raise _Stop(args[0] if args else kwargs["hidden_states"])

    handle = layer.register_forward_hook(post) if point.kind == "post" else \
        layer.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, **{"use_cache": False, **model_kwargs})
    except _Stop as stop:
        return stop.x
    finally:
        handle.remove()
    raise RuntimeError(f"the forward pass never reached {point.name}")


def _identity(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return hidden_states


@contextlib.contextmanager
def resume_from_hook(model: torch.nn.Module, point: HookPoint, x: torch.Tensor) -> Iterator[None]:
    """Inside the context, a forward pass runs only the layers after `point`, starting from `x` (B, T, d).

    The forward still needs `input_ids` of the right shape (for positions and masks); the
    embeddings it computes are discarded at the injection point.
    """
    layers = decoder_layers(model)
    skipped = list(layers)[: point.depth]
    for layer in skipped:
        layer.forward = _identity  # instance attribute shadows the class method
    if point.kind == "post":
        handle = layers[point.layer].register_forward_hook(lambda m, a, o: x, prepend=True)
    else:
        def inject(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
            if args:
                return (x, *args[1:]), kwargs
            return args, dict(kwargs, hidden_states=x)
        handle = layers[point.layer].register_forward_pre_hook(inject, with_kwargs=True, prepend=True)
    try:
        yield
    finally:
        handle.remove()
        for layer in skipped:
            del layer.forward
