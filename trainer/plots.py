"""Training curves as PNG (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics: Path, png: Path, title: str = "") -> Path:
    """Two panels from metrics.jsonl: training KL vs step; held-out CE vs training time with base/spliced lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "kl" in r]
    evals = [r["eval"] for r in rows if "eval" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot([r["step"] for r in steps], [r["kl"] for r in steps], lw=0.8)
    a.set(xlabel="step", ylabel="train KL(base || spliced+trained)", yscale="log", title="training loss")
    if evals:
        key = "ce_adapted" if "ce_adapted" in evals[0] else "ce_spliced"
        b.plot([e["train_s"] / 60 for e in evals], [e[key] for e in evals], "o-", label=key)
        b.axhline(evals[0]["ce_base"], color="k", ls="--", label="base model")
        b.axhline(evals[0]["ce_spliced"], color="r", ls=":", label="spliced, before training")
        b.set(xlabel="training wall time (min)", ylabel="held-out CE", title="held-out CE")
        b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
