"""Concept search: which SAE latents tell a concept's texts (set A) from other texts (set B).

The statistics are computed per latent over the tokens each SAE is spliced at (its position policy), from
aggregates that either path can build: the client from the server's top-k latents per token (torch-free), the
steering library (adapters/steering.py) from dense latents. This module imports no torch.

Rankings (`Ranking`), all larger-is-more-A:
    mean_diff   mean_A - mean_B, ranked by its size either way, no exclusion: the old `contrast`, kept as it was (a
                dense latent with a large scale wins)
    smd         standardised mean difference, (mean_A - mean_B) / sqrt((var_A + var_B) / 2): survives scale
    freq        firing frequency freq_A - freq_B, among latents with specificity freq_A / (freq_A + freq_B) >=
                `min_specificity`: survives scale and density

The other rankings exclude latents that fire on more than `max_density` of set B's tokens (an always-on latent, such
as one that fires on every token, tells nothing apart and steers nothing); the threshold is reported with the
result. `smd` is the default (chosen on the development concepts of bench/steering.py; docs/steering.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Literal, get_args

Ranking = Literal["smd", "freq", "mean_diff"]
RANKINGS: tuple[str, ...] = get_args(Ranking)
DEFAULT_RANKING: Ranking = "smd"
#: A latent active on more than this fraction of set B's tokens is excluded from every ranking.
MAX_DENSITY = 0.2
MIN_SPECIFICITY = 0.75


@dataclass
class LatentTally:
    """Running sums over tokens of one text set, per latent index: sum, sum of squares, tokens active."""

    tokens: int = 0
    sums: dict[int, float] = field(default_factory=dict)
    squares: dict[int, float] = field(default_factory=dict)
    active: dict[int, int] = field(default_factory=dict)

    def add_token(self, latents: Iterable[tuple[int, float]]) -> None:
        """One token's latents as (index, value) pairs; indices absent are 0 there."""
        self.tokens += 1
        for i, v in latents:
            if v > 0:
                self.sums[i] = self.sums.get(i, 0.0) + v
                self.squares[i] = self.squares.get(i, 0.0) + v * v
                self.active[i] = self.active.get(i, 0) + 1

    def mean(self, i: int) -> float:
        return self.sums.get(i, 0.0) / max(1, self.tokens)

    def var(self, i: int) -> float:
        m = self.mean(i)
        return max(0.0, self.squares.get(i, 0.0) / max(1, self.tokens) - m * m)

    def freq(self, i: int) -> float:
        return self.active.get(i, 0) / max(1, self.tokens)


@dataclass(frozen=True)
class Ranked:
    """One latent of a concept search, with the statistics behind its score."""

    feature: int
    score: float
    mean_a: float
    mean_b: float
    freq_a: float
    freq_b: float


def rank_latents(a: LatentTally, b: LatentTally, ranking: str = DEFAULT_RANKING, n: int = 10,
                 max_density: float = MAX_DENSITY, min_specificity: float = MIN_SPECIFICITY) -> list[Ranked]:
    """The `n` latents that most tell set A from set B by `ranking`, best first (except for `mean_diff`, latents
    denser than `max_density` on B are excluded)."""
    if ranking not in RANKINGS:
        raise ValueError(f"unknown ranking {ranking!r}; expected one of {RANKINGS}")
    out = []
    for i in set(a.sums) | set(b.sums):
        fa, fb = a.freq(i), b.freq(i)
        if ranking == "mean_diff":
            out.append(Ranked(i, a.mean(i) - b.mean(i), a.mean(i), b.mean(i), fa, fb))
            continue
        if fb > max_density:
            continue
        if ranking == "smd":
            score = (a.mean(i) - b.mean(i)) / math.sqrt((a.var(i) + b.var(i)) / 2 + 1e-12)
        else:
            if fa <= 0 or fa / (fa + fb) < min_specificity:
                continue
            score = fa - fb
        out.append(Ranked(i, score, a.mean(i), b.mean(i), fa, fb))
    out.sort(key=lambda r: (-abs(r.score) if ranking == "mean_diff" else -r.score, r.feature))
    return out[:n]
