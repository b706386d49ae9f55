"""`saelora train`: LoRA adapters on a frozen model around frozen SAEs (Chen, Engels, Tegmark 2025)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from saelora.adapters.bundle import save_bundle

from .config import TrainConfig
from .lora import add_lora, lora_config, resolve_layers
from .loop import Trainee, train_loop
from .plots import plot_metrics
from .setup import manifest_for, prepare, shared_prefix_point

log = logging.getLogger(__name__)


def train_lora(cfg: TrainConfig) -> tuple[Path, dict[str, Any]]:
    """Train a LoRA adapter; returns (bundle path, final eval)."""
    t0 = time.perf_counter()
    setup = prepare(cfg)
    out = setup.out
    settings = cfg.lora
    points = [s.hook for s in setup.saes]
    peft_cfg = lora_config(setup.lm.model, settings, points)
    model = add_lora(setup.lm.model, settings, points)
    layers = resolve_layers(setup.lm.model, settings.layer_spec(), points)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    log.info("LoRA r=%d on %s, layers %s: %d trainable parameters", settings.rank, sorted(peft_cfg.target_modules),
             settings.layers, sum(p.numel() for _, p in named))
    tr = Trainee(model, setup.saes, named, shared_prefix_point(setup.lm.model, setup.saes, layers), has_adapter=True)
    st = train_loop(tr, setup.corpus.train, setup.corpus.val, cfg, out, setup.dp)
    if not setup.dp.is_main:  # rank 0 writes; the weights are the same on every rank
        return out / "adapter", st.evals[-1]
    bundle = save_bundle(out / "adapter", model, manifest_for(cfg, setup, st, time.perf_counter() - t0))
    plot_metrics(out / "metrics.jsonl", out / "curves.png",
                 title=f"LoRA r={settings.rank} ({settings.layers}) around SAE")
    log.info("adapter bundle written to %s", bundle)
    return bundle, st.evals[-1]
