"""Linear layers on prepacked oneDNN weights: the torch engine's decode matmuls at memory speed on CPU.

A decode step multiplies a few rows by every weight matrix of the model, so it streams the weights from memory
once per step. `F.linear` (MKL sgemm) reads them at about 9 GB/s on this project's machine for 4 rows; oneDNN with
the weight reordered once into its blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, the op inductor's
CPU fusions use) reads them at about 21 GB/s (measured: the embedded model's 90 MLP matrices, 4 rows, 35 ms
against 15 ms). vLLM's CPU backend does the same (`onednn_mm`). It is exact across batch sizes too: a row's output
does not depend on the rows beside it (MKL's does, in the last bits), and prefill-sized inputs are no slower.

`pack_linears(model)` keeps each `nn.Linear` an `nn.Linear` (its `weight` stays the parameter everything else
reads) and gives it an instance `forward` over the packed copy. The copy is taken
once, at engine set-up, so the base weights must not change afterwards: serving never changes them (adapters
are added beside them, never merged). Anything that needs gradients falls back to `F.linear`. The packed copies
cost one more copy of the linear weights in memory.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

ROWS_HINT = 4  # the batch size oneDNN's layout is chosen for (decode batches); any batch size runs


def packing_available(model: torch.nn.Module) -> bool:
    p = next(model.parameters(), None)
    return (p is not None and p.device.type == "cpu" and p.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack_linears(model: torch.nn.Module) -> int:
    """Give every fp32 CPU `nn.Linear` of `model` a forward over a prepacked oneDNN copy of its weight;
    returns how many. Idempotent; does nothing where oneDNN is absent or the weights are not fp32 on CPU."""
    if not packing_available(model):
        return 0
    n = 0
    for module in model.modules():
        # a layer with adapters beside it (lora.py) keeps its forward, which reads the packed copy through linear()
        if type(module) is torch.nn.Linear and getattr(module, "saelora_packed", None) is None:
            module.saelora_packed = pack(module.weight)
            if "forward" not in vars(module):
                module.forward = _forward_of(module)
            n += 1
    log.info("%d linear layers on prepacked oneDNN weights", n)
    return n


def pack(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked copy of an (out, in) fp32 weight."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS_HINT)


def linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` without the module call: the packed op when `module` has one, else `F.linear`."""
    packed = getattr(module, "saelora_packed", None)
    if packed is None or (torch.is_grad_enabled() and module.weight.requires_grad) or x.dtype != torch.float32:
        return F.linear(x, module.weight, module.bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, module.bias, "none", [], "")


def reset_forward(module: torch.nn.Linear) -> None:
    """Give `module` back the forward it has without adapters: over its packed copy if it has one, else its
    class's."""
    if getattr(module, "saelora_packed", None) is not None:
        module.forward = _forward_of(module)
    else:
        vars(module).pop("forward", None)


def _forward_of(module: torch.nn.Linear):  # noqa: ANN202
    def forward(x: torch.Tensor) -> torch.Tensor:
        return linear(module, x)
    return forward
