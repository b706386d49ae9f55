"""`saelora eval`: evaluate SAEs (and an adapter) on a held-out split and on any other corpus given.

With `--adapter`, everything the adapter was trained under comes from its manifest unless given here: the
SAEs, each SAE's position policy, and the corpus (sources, row length, BOS, hash bands), so the numbers are
taken on the same kind of rows at the same positions as in training.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from saelora.adapters.config import DEFAULT_CORPUS, DEFAULT_MODEL
from saelora.adapters.bundle import BundleManifest, attach_bundle, load_bundle, read_manifest
from saelora.adapters.corpus import CorpusConfig, load_corpus
from saelora.adapters.errors import ConfigError
from saelora.adapters.models import load_model
from saelora.adapters.policy import PositionPolicy, apply_override, corpus_bos
from saelora.adapters.saes import load_sae

from .evaluate import evaluate
from .config import opt

log = logging.getLogger(__name__)
SPLITS = ("val", "test")


@dataclass
class EvalConfig:
    model: str = opt(DEFAULT_MODEL, "base model spec")
    saes: list[str] = opt(factory=list, help="sae-lens folders (default: the adapter's SAEs)")
    adapter: str | None = opt(None, "adapter bundle to evaluate (omit to evaluate the SAEs alone)")
    corpus: list[str] = opt(factory=list,
                            help=f"held-out split evaluated (default: the adapter's, else {DEFAULT_CORPUS})")
    split: str = opt("val", "val | test (test needs a corpus with a test band, e.g. --test-fraction)")
    val_fraction: float | None = opt(None, "corpus hash bands (default: the adapter's, else 0.05 and 0)")
    test_fraction: float | None = opt(None, "see val_fraction")
    held_out: list[str] = opt(factory=list, help="sources whose own held-out split (same hash bands) is evaluated "
                                                 "too, one result each: e.g. each genre of a mixture")
    extra_corpus: list[str] = opt(factory=list, help="other sources, evaluated whole, one result each")
    rows: int = opt(64, "rows per corpus")
    seq_len: int | None = opt(None, "tokens per row (default: the adapter's, else 256)")
    batch_size: int = opt(4, "rows per forward")
    policy: str | None = opt(None, "position-policy override (default: the adapter's recorded policy, else the SAE's)")
    out: str | None = opt(None, "JSON results (default: <adapter>/eval.json, else eval.json)")
    device: str | None = opt(None, "default: cuda if available, else cpu")


def _manifest(cfg: EvalConfig) -> BundleManifest | None:
    return read_manifest(cfg.adapter) if cfg.adapter else None


def _corpus_config(cfg: EvalConfig, trained: dict[str, Any], bos: bool, seq_len: int | None = None,
                   sources: tuple[str, ...] | None = None, holdout: bool = True) -> CorpusConfig:
    pick = lambda mine, key, default: mine if mine not in (None, []) else trained.get(key, default)  # noqa: E731
    return CorpusConfig(sources=sources or tuple(pick(cfg.corpus, "sources", [DEFAULT_CORPUS])),
                        seq_len=seq_len or pick(cfg.seq_len, "seq_len", 256),
                        val_fraction=pick(cfg.val_fraction, "val_fraction", 0.05) if holdout else 0.0,
                        test_fraction=pick(cfg.test_fraction, "test_fraction", 0.0) if holdout else 0.0,
                        prepend_bos=bos)


def run_eval(cfg: EvalConfig) -> dict[str, dict[str, Any]]:
    """Results per corpus name; also written as JSON."""
    if cfg.split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {cfg.split!r}")
    lm = load_model(cfg.model, device=cfg.device)
    manifest = _manifest(cfg)
    entries = manifest.saes if manifest else []
    specs = list(cfg.saes) or [e["source"] for e in entries]
    if not specs:
        raise ConfigError("no SAE to evaluate: pass --sae or --adapter")
    recorded = {e["source"]: e["policy"] for e in entries if "policy" in e}
    saes = [load_sae(lm.model, s, tokenizer=lm.tokenizer,
                     policy=apply_override(PositionPolicy.from_json(recorded[s]), cfg.policy)
                     if s in recorded else cfg.policy) for s in specs]
    model = lm.model
    if cfg.adapter:
        model = attach_bundle(model, load_bundle(cfg.adapter, lm.fingerprint, saes, lm.model), "adapter")
    dev = next(model.parameters()).device
    trained = manifest.training.get("corpus", {}).get("config", {}) if manifest else {}
    bos = corpus_bos([s.policy for s in saes])
    main = load_corpus(lm.tokenizer, _corpus_config(cfg, trained, bos))
    held = main.test if cfg.split == "test" else main.val
    if held is None or not len(held):
        raise ConfigError(f"the corpus has no {cfg.split} rows (set --test-fraction for a test band)")
    sets = {"held-out" if cfg.split == "val" else "held-out-test": held}
    seq_len = main.info["config"]["seq_len"]
    for src in cfg.held_out:
        part = load_corpus(lm.tokenizer, _corpus_config(cfg, trained, bos, seq_len, (src,)))
        sets[f"{src} held-out" + ("" if cfg.split == "val" else "-test")] = \
            part.test if cfg.split == "test" else part.val
    for src in cfg.extra_corpus:
        sets[src] = load_corpus(lm.tokenizer, _corpus_config(cfg, trained, bos, seq_len, (src,), holdout=False)).train
    results = {}
    for s in saes:
        log.info("SAE %s: spliced at %s", s.name, s.policy.describe())
    for name, rows in sets.items():
        rows = rows[: cfg.rows].to(dev)
        log.info("evaluating on %s: %d rows of %d tokens", name, len(rows), rows.shape[1])
        with torch.no_grad():
            results[name] = evaluate(model, saes, rows, cfg.batch_size, adapter=bool(cfg.adapter)).to_json()
        results[name]["positions"] = {s.name: s.policy.describe() for s in saes}
    out = Path(cfg.out or (Path(cfg.adapter) / "eval.json" if cfg.adapter else "eval.json"))
    out.write_text(json.dumps({"config": asdict(cfg), "policies": {s.name: s.policy.to_json() for s in saes},
                               "results": results}, indent=2))
    log.info("results written to %s", out)
    return results
