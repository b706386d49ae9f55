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
def _projections(model: torch.nn.Module, sae: LoadedSAE, indices: torch.Tensor) -> torch.Tensor:
    """(n, V) fp32: the decoder rows `indices` through the final norm and the unembedding."""
    norm = getattr(backbone(model), "norm", None)
    head = unwrap(model).get_output_embeddings()
    w = head.weight
    h = sae.sae.W_dec[indices].detach().to(device=w.device, dtype=w.dtype)[:, None]  # (n, 1, d)
    if norm is not None:
        h = norm(h)
    return head(h)[:, 0].float()


def latent_logits(model: torch.nn.Module, sae: LoadedSAE, index: int, k: int = 10) -> tuple[TokenValues, TokenValues]:
    """The k tokens latent `index` of `sae` promotes most and the k it suppresses most, with their logit values."""
    (promoted, suppressed), = top_logits(model, sae, k, indices=[index])
    return promoted, suppressed


def top_logits(model: torch.nn.Module, sae: LoadedSAE, k: int = 10, indices: list[int] | None = None,
               chunk: int = 256) -> list[tuple[TokenValues, TokenValues]]:
    """`latent_logits` for many latents (default: all), `chunk` at a time so (chunk, V) stays small."""
    idx = torch.arange(sae.d_sae) if indices is None else torch.tensor(indices)
    out = []
    for part in idx.split(chunk):
        logits = _projections(model, sae, part)  # (n, V)
        kk = min(k, logits.shape[-1])
        top, low = logits.topk(kk, dim=-1), (-logits).topk(kk, dim=-1)
        for r in range(len(part)):
            out.append(([(int(i), float(v)) for v, i in zip(top.values[r], top.indices[r], strict=True)],
                        [(int(i), -float(v)) for v, i in zip(low.values[r], low.indices[r], strict=True)]))
    return out


@torch.no_grad()
def similar_latents(sae: LoadedSAE, index: int, n: int = 10) -> TokenValues:
    """The n latents whose decoder directions are closest to latent `index`'s by cosine (itself left out):
    [(latent, cosine)], closest first. What a "find similar" button on a feature page shows."""
    w = sae.sae.W_dec.detach().float()
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = w @ w[index]
    cos[index] = -2.0  # never itself
    top = cos.topk(min(n, len(cos) - 1))
    return [(int(i), round(float(v), 6)) for v, i in zip(top.values, top.indices, strict=True)]
