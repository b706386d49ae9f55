"""What a latent writes to the logits (the direct path): its decoder direction through the final norm and the
unembedding, as Neuronpedia and Goodfire show it.

    promoted, suppressed = latent_logits(model, sae, index, k=10)   # [(token_id, value)], strongest first

The approximation: the direction goes through the model's own final norm module as if it were the whole
residual stream. The norm's per-channel gain applies exactly; its division by the residual's RMS is that of
the direction alone, a positive factor that scales every value alike, so the ranking is what the gain and the
unembedding make it. Attention and MLP layers after the SAE's hook (the indirect paths) are left out.
"""

from __future__ import annotations

import torch

from .hooks import backbone, unwrap
from .saes import LoadedSAE

TokenValues = list[tuple[int, float]]


@torch.no_grad()
def latent_logits(model: torch.nn.Module, sae: LoadedSAE, index: int, k: int = 10) -> tuple[TokenValues, TokenValues]:
    """The k tokens latent `index` of `sae` promotes most and the k it suppresses most, with their logit values."""
    base = unwrap(model)
    norm = getattr(backbone(model), "norm", None)
    head = base.get_output_embeddings()
    direction = sae.sae.W_dec[index].detach()  # (d,)
    w = head.weight
    h = direction.to(device=w.device, dtype=w.dtype)[None, None]  # (1, 1, d)
    if norm is not None:
        h = norm(h)
    logits = head(h)[0, 0].float()  # (V,)
    k = min(k, logits.numel())
    top, low = logits.topk(k), (-logits).topk(k)
    return ([(int(i), float(v)) for v, i in zip(top.values, top.indices, strict=True)],
            [(int(i), -float(v)) for v, i in zip(low.values, low.indices, strict=True)])
