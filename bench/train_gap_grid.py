"""The train_gap study's learning-rate grids: a log-spaced grid run point by point, extended by one point beyond
an edge while the best sits there, so that a choice is bracketed (or the extensions are spent and it says so)."""

from __future__ import annotations

import logging
from typing import Any, Callable

log = logging.getLogger("bench.train_gap")


def bracketed_sweep(name: str, grid: list[float], run: Callable[[float], dict[str, Any]],
                    score: Callable[[dict[str, Any]], float],
                    max_extend: int) -> tuple[list[dict[str, Any]], dict[str, Any], bool]:
    """`run(lr)` for every rate of `grid`, then, up to `max_extend` times while the lowest `score` sits at an edge
    of the rates run, one more rate a grid step beyond that edge. Returns the runs in rate order, the best run,
    and whether it still sits at an edge (the extensions spent)."""
    lrs = sorted(grid)
    recs = {lr: run(lr) for lr in lrs}
    for _ in range(max_extend if len(lrs) > 1 else 0):
        best = min(lrs, key=lambda lr: score(recs[lr]))
        if best == lrs[0]:
            new = lrs[0] ** 2 / lrs[1]
        elif best == lrs[-1]:
            new = lrs[-1] ** 2 / lrs[-2]
        else:
            break
        log.info("%s: the best rate %g is at the grid's edge: adding %g", name, best, new)
        lrs = sorted(lrs + [new])
        recs[new] = run(new)
    best = min(lrs, key=lambda lr: score(recs[lr]))
    return [recs[lr] for lr in lrs], recs[best], best in (lrs[0], lrs[-1])
