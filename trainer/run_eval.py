"""`saelora eval`: evaluate SAEs (and an adapter) on the held-out split and on any other corpus given."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from saelora.adapters.errors import ConfigError

from saelora.adapters.bundle import attach_bundle, load_bundle
from saelora.adapters.corpus import CorpusConfig, load_corpus
from saelora.adapters.models import load_model
from saelora.adapters.saes import load_sae

from .evaluate import evaluate

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    model: str = "smollm2-135m"  # base model spec
    saes: list[str] = field(default_factory=list)  # sae-lens folders (default: the adapter's SAEs)
    adapter: str | None = None  # adapter bundle to evaluate (omit to evaluate the SAEs alone)
    corpus: list[str] = field(default_factory=lambda: ["wiki"])  # its held-out split is evaluated
    extra_corpus: list[str] = field(default_factory=list)  # other sources, evaluated whole, one result each
    rows: int = 64  # rows per corpus
    seq_len: int = 256  # tokens per row
    batch_size: int = 4  # rows per forward
    skip_first: bool = False  # leave position 0 unspliced
    out: str | None = None  # JSON results (default: <adapter>/eval.json, else eval.json)
    device: str | None = None  # default: cuda if available, else cpu


def run_eval(cfg: EvalConfig) -> dict[str, dict[str, Any]]:
    """Results per corpus name; also written as JSON."""
    lm = load_model(cfg.model, device=cfg.device)
    specs = list(cfg.saes)
    if not specs and cfg.adapter:
        specs = [s["source"] for s in json.loads((Path(cfg.adapter) / "saelora.json").read_text())["saes"]]
    if not specs:
        raise ConfigError("no SAE to evaluate: pass --sae or --adapter")
    saes = [load_sae(lm.model, s) for s in specs]
    model = lm.model
    if cfg.adapter:
        model = attach_bundle(model, load_bundle(cfg.adapter, lm.fingerprint, saes, lm.model), "adapter")
    dev = next(model.parameters()).device
    sets = {"held-out": load_corpus(lm.tokenizer, CorpusConfig(tuple(cfg.corpus), cfg.seq_len)).val}
    for src in cfg.extra_corpus:
        c = load_corpus(lm.tokenizer, CorpusConfig((src,), cfg.seq_len, val_fraction=0.0))
        sets[src] = c.train
    results = {}
    for name, rows in sets.items():
        rows = rows[: cfg.rows].to(dev)
        log.info("evaluating on %s: %d rows of %d tokens", name, len(rows), cfg.seq_len)
        with torch.no_grad():
            results[name] = evaluate(model, saes, rows, cfg.batch_size, adapter=bool(cfg.adapter),
                                     skip_first=cfg.skip_first)
    out = Path(cfg.out or (Path(cfg.adapter) / "eval.json" if cfg.adapter else "eval.json"))
    out.write_text(json.dumps({"config": asdict(cfg), "results": results}, indent=2))
    log.info("results written to %s", out)
    return results
