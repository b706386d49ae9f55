"""Steering from text sets, on the torch side: read a set of texts at an SAE's hook (its latents and residual
stream at the positions the SAE is spliced at), then derive a concept's latents (adapters/search.py), its
difference-of-means vector, and the scales that calibrated units are measured in (adapters/units.py).

    pos = read_texts(lm.model, lm.tokenizer, sae, concept_texts)
    neg = read_texts(lm.model, lm.tokenizer, sae, other_texts)
    best = concept_latents(pos, neg)[0].feature        # by standardised mean difference, dense latents excluded
    v = diffmean(pos, neg)                              # (d,) mean residual of the concept minus the others
    edit = VectorEdit(sae.name, tuple(v.tolist()), "add", to_raw(0.5, "norm", scales(sae, pos), vector=v.tolist()))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .activations import run_to_hook
from .saes import LoadedSAE
from .search import DEFAULT_RANKING, MAX_DENSITY, LatentTally, Ranked, rank_latents
from .units import SteerScales


@dataclass
class TextReading:
    """A text set read at an SAE's hook, over the positions the SAE is spliced at: latent tallies, the residual
    sum (for means), and each such position's residual norm."""

    tally: LatentTally = field(default_factory=LatentTally)
    resid_sum: torch.Tensor | None = None  # (d,) fp32
    sq_sum: float = 0.0  # sum of squared residual norms (for the spread about the mean)
    norms: list[float] = field(default_factory=list)
    texts: int = 0

    @property
    def tokens(self) -> int:
        return self.tally.tokens

    def mean_residual(self) -> torch.Tensor:
        if self.resid_sum is None or not self.tokens:
            raise ValueError("no spliced position was read: the text set is empty")
        return self.resid_sum / self.tokens


def _batches(tokenizer: Any, texts: Sequence[str], max_len: int, batch_size: int,
             bos: int | None) -> Any:
    for i in range(0, len(texts), batch_size):
        rows = [([bos] if bos is not None else []) + tokenizer(t, add_special_tokens=False)["input_ids"][:max_len]
                for t in texts[i:i + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[r, :len(row)] = 1
        yield ids, mask


@torch.no_grad()
def read_texts(model: torch.nn.Module, tokenizer: Any, sae: LoadedSAE, texts: Sequence[str], max_len: int = 128,
               batch_size: int = 16) -> TextReading:
    """Read `texts` (each cut to `max_len` tokens; rows start with BOS where the SAE's policy says so)."""
    bos = tokenizer.bos_token_id if sae.policy.prepend_bos else None
    device = next(model.parameters()).device
    out = TextReading(texts=len(texts))
    for ids, mask in _batches(tokenizer, texts, max_len, batch_size, bos):
        ids, mask = ids.to(device), mask.to(device)
        x = run_to_hook(model, sae.hook, ids, attention_mask=mask).float()  # (b, T, d)
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, -1)
        spliced = ~sae.policy.keep_mask(pos, ids, x)  # (b, T): padding, sinks and BOS/EOS excluded
        xs = x[spliced]  # (n, d)
        z = sae.encode(xs)  # (n, d_sae)
        out.resid_sum = xs.sum(0) if out.resid_sum is None else out.resid_sum + xs.sum(0)
        out.norms.extend(xs.norm(dim=-1).tolist())
        out.sq_sum += float(xs.square().sum())
        nz = z > 0
        rows, cols = nz.nonzero(as_tuple=True)
        vals = z[rows, cols]
        per_token: list[list[tuple[int, float]]] = [[] for _ in range(z.shape[0])]
        for r, c, v in zip(rows.tolist(), cols.tolist(), vals.tolist(), strict=True):
            per_token[r].append((c, v))
        for latents in per_token:
            out.tally.add_token(latents)
    return out


def concept_latents(pos: TextReading, neg: TextReading, ranking: str = DEFAULT_RANKING, n: int = 10,
                    max_density: float = MAX_DENSITY) -> list[Ranked]:
    """The latents that most tell `pos` from `neg` (adapters/search.py), best first."""
    return rank_latents(pos.tally, neg.tally, ranking, n=n, max_density=max_density)


def diffmean(pos: TextReading, neg: TextReading) -> torch.Tensor:
    """(d,) the difference of mean residuals, concept minus others: the DiffMean steering vector (AxBench)."""
    return pos.mean_residual() - neg.mean_residual()


def median_norm(reading: TextReading) -> float:
    """The median residual norm at the hook over a reading's spliced positions."""
    if not reading.norms:
        raise ValueError("no spliced position was read: the text set is empty")
    return float(torch.tensor(reading.norms).median())


def spread(reading: TextReading) -> float:
    """The residual's root-mean-square distance from its mean over a reading's spliced positions: its typical norm
    with the constant component taken out. Gemma 3's residual is ~98% one constant direction, SmolLM2's ~70%, so
    this, not `median_norm`, is what strengths transfer between models by (docs/steering.md)."""
    mean = reading.mean_residual()
    return max(reading.sq_sum / reading.tokens - float(mean.square().sum()), 0.0) ** 0.5


def decoder_norms(sae: LoadedSAE) -> list[float]:
    """|W_dec[i]| per latent (what a unit change of latent i moves the reconstruction by)."""
    return sae.sae.W_dec.detach().float().norm(dim=-1).tolist()


def scales(sae: LoadedSAE, max_act: Sequence[float], reading: TextReading) -> SteerScales:
    """The units' scales of `sae`: latents' max activations (from its descriptions), its decoder norms, and the
    median residual norm of `reading`."""
    return SteerScales(list(max_act), decoder_norms(sae), median_norm(reading))


def project_direction(sae: LoadedSAE, feature: int) -> tuple[float, ...]:
    """Latent `feature`'s decoder direction, for the paper's projection scaling (a `project` vector edit)."""
    return tuple(sae.sae.W_dec[feature].detach().float().tolist())
