"""Linear layers and SAE encoders on prepacked oneDNN weights: decode matmuls at memory speed on CPU.

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

`pack_sae_encoder(sae)` does the same for a sae-lens TopK SAE's encoder (both engines; decision 44): its
`x @ W_enc + b_enc` on a packed copy of `W_enc`, and the decoder-norm rescale on a norm computed once (sae-lens
recomputes `W_dec.norm(dim=-1)` at every call: another pass over a matrix as large as the encoder). The rest is
sae-lens's own (`process_sae_in`, hook points, `activation_fn`). Measured on the shipped 576 x 4608 SAE, 4 decode
rows, caches cold: 2.3 ms a call against 1.0 ms; the latents equal sae-lens's to fp32 kernel rounding (a test).
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


def pack_sae_encoder(sae: torch.nn.Module) -> bool:
    """Give a sae-lens TopK SAE an instance `encode` over a packed copy of its encoder; True if it got one.
    Only TopK encoders (fp32 on CPU) are packed: any other architecture keeps sae-lens's own, and so does a call
    with gradients wanted. Only the matmul and the norm differ from sae-lens's `TopKSAE.encode`."""
    from sae_lens.saes.topk_sae import TopKSAE

    if type(sae) is not TopKSAE or not packing_available(sae) or getattr(sae, "saelora_packed", None) is not None:
        return False
    norm = sae.W_dec.detach().norm(dim=-1) if sae.cfg.rescale_acts_by_decoder_norm else None  # W_dec is frozen
    sae.saelora_packed = pack(sae.W_enc.detach().t().contiguous())
    own = type(sae).encode.__get__(sae)

    def encode(x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() and sae.W_enc.requires_grad) or x.dtype != torch.float32:
            return own(x)
        sae_in = sae.process_sae_in(x)
        pre = sae.hook_sae_acts_pre(torch.ops.mkldnn._linear_pointwise(sae_in, sae.saelora_packed, sae.b_enc,
                                                                       "none", [], ""))
        pre = pre * norm if norm is not None else pre
        return sae.hook_sae_acts_post(sae.activation_fn(pre))
    sae.encode = encode
    return True


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
