"""`saelora train-e2e`: the baseline of Karvonen 2025 (arXiv 2503.17272) — fine-tune the SAE itself with
KL (+ optional MSE) to the original model, model frozen. Same data, budget accounting and eval as LoRA."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .loop import Trainee, train_loop
from .objective import first_splice_point
from .plots import plot_metrics
from .setup import manifest_for, prepare

log = logging.getLogger(__name__)


def train_e2e(cfg: TrainConfig) -> tuple[Path, dict[str, Any]]:
    """Fine-tune the SAEs end to end; writes sae-lens folders to out/saes/<name>; returns (folder, final eval)."""
    t0 = time.perf_counter()
    setup = prepare(cfg)
    out = setup.out
    named = []
    for s in setup.saes:
        s.sae.requires_grad_(True).train()
        named += [(f"{s.name}.{n}", p) for n, p in s.sae.named_parameters()]
    # The model is frozen and unadapted: the layers before the first SAE are shared by teacher and student.
    tr = Trainee(setup.lm.model, setup.saes, named, first_splice_point(setup.saes), has_adapter=False)
    st = train_loop(tr, setup.corpus.train, setup.corpus.val, cfg, out, setup.dp)
    folder = out / "saes"
    if not setup.dp.is_main:  # rank 0 writes; the weights are the same on every rank
        return folder, st.evals[-1]
    for s in setup.saes:
        s.sae.requires_grad_(False).eval()
        s.sae.cfg.metadata.e2e_finetuned = True
        s.sae.save_model(folder / s.name)
    summary = manifest_for(cfg, setup, st, time.perf_counter() - t0)
    (out / "e2e.json").write_text(json.dumps({"training": summary.training, "metrics": summary.metrics,
                                              "base_model": summary.base_model}, indent=2, default=str))
    plot_metrics(out / "metrics.jsonl", out / "curves.png", title="end-to-end SAE fine-tuning")
    log.info("fine-tuned SAEs written to %s", folder)
    return folder, st.evals[-1]
