"""Read a steering benchmark's rows: per method, the strength chosen on the development concepts (most successes,
ties to the smaller gap), and that one strength reported on the test concepts, with a 95% bootstrap interval over
generations; auto-steer and the reference methods beside them; and the Pareto plot of every setting.

Success = on-concept (judge >= 0.5), fluency gap <= 0.5 nat and distinct-2 >= 0.6, per generation.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any, Sequence

from .concepts import DEV_CONCEPTS

SWEPT = ("latent_add", "latent_set", "diffmean", "project")


def _pool(rows: Sequence[dict[str, Any]], key: str) -> list[float]:
    out = []
    for r in rows:
        g = r["per_generation"]
        if key == "concept":
            out += [float(p >= 0.5) for p in g["concept"]]
        elif key == "success":
            out += [float(p >= 0.5 and d <= 0.5 and t >= 0.6)
                    for p, d, t in zip(g["concept"], g["gap"], g["distinct2"], strict=True)]
        else:
            out += list(g[key])
    return out


def _interval(values: list[float], seed: int = 0, n: int = 1000) -> list[float]:
    if not values:
        return [float("nan")] * 2
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(n))
    return [round(means[int(0.025 * n)], 4), round(means[int(0.975 * n) - 1], 4)]


def _dev_score(rows: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """Most successes, then the smaller mean gap."""
    succ, gap = _pool(rows, "success"), [g for g in _pool(rows, "gap") if abs(g) != float("inf")]
    return sum(succ) / max(1, len(succ)), -sum(gap) / max(1, len(gap))


def summarise(rows: Sequence[dict[str, Any]], condition: str = "base", dev: Sequence[str] = DEV_CONCEPTS,
              fixed: dict[str, float] | None = None) -> dict[str, Any]:
    """Per method: the dev-chosen strength and the test-band figures at it (mean over generations, 95% CI).
    `fixed`: strengths chosen elsewhere (a run without development concepts takes another model's choices)."""
    rows = [r for r in rows if r["condition"] == condition]
    by: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by[(r["method"], r["strength"])].append(r)
    out: dict[str, Any] = {}
    for method in sorted({r["method"] for r in rows}):
        strengths = sorted({s for m, s in by if m == method})
        if method in SWEPT and fixed and method in fixed:
            chosen = fixed[method]
            test = [r for r in by[(method, chosen)] if r["target"] not in dev]
        elif method in SWEPT:
            chosen = max(strengths, key=lambda s, m=method: _dev_score([r for r in by[(m, s)] if r["target"] in dev]))
            test = [r for r in by[(method, chosen)] if r["target"] not in dev]
        else:  # none, prompt, auto: nothing to choose (auto chooses per concept, on its own)
            chosen = None
            test = [r for r in rows if r["method"] == method and r["target"] not in dev]
        out[method] = {"strength": chosen, "concepts": sorted({r["target"] for r in test}),
                       "n": len(_pool(test, "concept"))}
        for key in ("concept", "success", "gap", "distinct2"):
            vals = _pool(test, key)
            finite = [v for v in vals if v == v and abs(v) != float("inf")]
            out[method][key] = round(sum(finite) / max(1, len(finite)), 4)
            out[method][f"{key}_ci"] = _interval(finite)
        out[method]["per_concept"] = {r["target"]: {k: r[k] for k in ("concept", "fluency_gap", "distinct2",
                                                                          "success", "strength")} for r in test}
    return out


def _ci(s: dict[str, Any], k: str) -> str:
    return f"{s[k]:.2f} [{s[k + '_ci'][0]:.2f}, {s[k + '_ci'][1]:.2f}]"


def table(summary: dict[str, Any]) -> str:
    """Markdown table of `summarise`'s output."""
    lines = ["| method | strength (chosen on dev) | on-concept | success | fluency gap (nat) | distinct-2 | n |",
             "|---|---|---|---|---|---|---|"]
    for m, s in summary.items():
        lines.append(f"| {m} | {s['strength'] if s['strength'] is not None else '-'} | {_ci(s, 'concept')} | "
                     f"{_ci(s, 'success')} | {_ci(s, 'gap')} | {s['distinct2']:.2f} | {s['n']} |")
    return "\n".join(lines)


def pareto_plot(rows_by_model: dict[str, Sequence[dict[str, Any]]], path: str,
                dev: Sequence[str] = DEV_CONCEPTS) -> None:
    """Concept score against fluency gap, one point per (method, strength), means over the test concepts in the
    base condition; one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows_by_model), figsize=(6.5 * len(rows_by_model), 4.5), squeeze=False)
    for ax, (model, rows) in zip(axes[0], rows_by_model.items(), strict=True):
        rows = [r for r in rows if r["condition"] == "base" and r["target"] not in dev]
        for method in sorted({r["method"] for r in rows}):
            pts = defaultdict(list)
            for r in rows:
                if r["method"] == method:
                    pts[r["strength"]].append(r)
            xs = [sum(r["fluency_gap"] for r in v) / len(v) for _, v in sorted(pts.items())]
            ys = [sum(r["concept"] for r in v) / len(v) for _, v in sorted(pts.items())]
            ax.plot(xs, ys, "o-" if len(xs) > 1 else "s", label=method)
        ax.axvline(0.5, color="grey", ls=":", lw=1)
        ax.set_xlabel("fluency gap (nats above real concept text; lower is better)")
        ax.set_ylabel("on-concept fraction (judge)")
        ax.set_title(f"{model}: test concepts, base condition")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
