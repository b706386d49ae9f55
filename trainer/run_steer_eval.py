"""The steering benchmark end to end (`saelora steer-eval`): load the model, SAE and adapter, fit the judge, then
for every concept and condition run every method's grid (trainer/steer_eval.py), and summarise.

Auto-steer runs in the `base` condition only: it is what a request to the server gets (error_term, no adapter).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from .concepts import load_suite
from .steer_eval import METHODS, Runner, SteerEvalConfig, concept_rows, fit_judge, plan

log = logging.getLogger(__name__)


def _max_act(lm: Any, sae: Any, folder: str) -> list[float]:
    """Each latent's max activation from the SAE's descriptions (written by `saelora features` when missing)."""
    from saelora.adapters.config import descriptions_file

    from .features import FeaturesConfig, describe_features, write_features

    path = descriptions_file(folder)
    data = json.loads(path.read_text()) if path.is_file() else None
    if data is None or "resid_norm" not in data:
        from saelora.adapters.corpus import CorpusConfig, load_corpus
        from saelora.adapters.policy import corpus_bos

        cfg = FeaturesConfig(saes=[folder], top_n=8)
        corpus = load_corpus(lm.tokenizer, CorpusConfig(seq_len=cfg.seq_len, prepend_bos=corpus_bos([sae.policy])))
        data = describe_features(lm.model, lm.tokenizer, sae, corpus.val[: cfg.rows], cfg)
        write_features(data, path.parent)
    return [float(f["max"]) for f in data["features"]]


def _sae_folder(model: str) -> str:
    """The demo's SAE of `model` (a copy of the shipped one, or trained there), where descriptions may be written."""
    from saelora.adapters.config import cache_dir

    demo = cache_dir() / "demo" / model / "sae"
    if not (demo / "cfg.json").is_file():
        from saelora.adapters.errors import ConfigError

        raise ConfigError(f"no demo SAE for {model}: give --sae, or run `saelora demo --model {model}` first")
    return str(demo)


def _conditions(model: Any, adapter: bool) -> list[tuple[str, str, Callable[[], Any]]]:
    """(name, splice mode, context in which generation runs). Without an adapter only `base`."""
    off = model.disable_adapter if adapter else contextlib.nullcontext
    out = [("base", "error_term", off)]
    if adapter:
        out += [("spliced", "replace", off), ("adapted", "replace", contextlib.nullcontext)]
    return out


def run_steer_eval(cfg: SteerEvalConfig) -> dict[str, Any]:
    from saelora.adapters.bundle import attach_bundle, load_bundle
    from saelora.adapters.models import load_model
    from saelora.adapters.saes import load_sae
    from saelora.adapters.splice_hooks import Splice

    t0 = time.perf_counter()
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad:
        from saelora.adapters.errors import ConfigError

        raise ConfigError(f"unknown methods {bad}; expected some of {METHODS}")
    lm = load_model(cfg.model, device=cfg.device)
    folder = cfg.sae or _sae_folder(cfg.model)
    sae = load_sae(lm.model, folder, tokenizer=lm.tokenizer)
    max_act = _max_act(lm, sae, folder)
    if cfg.adapter:
        lm = dataclasses.replace(lm, model=attach_bundle(lm.model, load_bundle(cfg.adapter, lm.fingerprint, [sae]),
                                                         "adapter"))
    suite = load_suite(cfg.suite)
    concepts = cfg.concepts or list(suite.concepts)
    judge, accuracy = fit_judge(suite)
    conditions = _conditions(lm.model, bool(cfg.adapter))
    base = conditions[0][2]
    splice = Splice(lm.model, [sae], mode="error_term").install()
    rows, plans = [], {}
    try:
        for concept in tqdm(concepts, desc="steer-eval", disable=None):
            with base():
                p = plan(lm, sae, suite, concept, max_act, cfg)
            plans[concept] = {"latents": p.latents, "feature": p.feature, "reference_ce": round(p.reference, 4),
                              "resid_norm": round(p.scales.resid_norm, 3)}
            for name, mode, ctx in conditions:
                methods = [m for m in cfg.methods if name == "base" or (m in cfg.adapter_methods and m != "auto")]
                # fluency is scored with the adapter off; a context already off is not entered twice (PEFT's
                # disable_adapter turns the adapter back on when it exits)
                scorer = contextlib.nullcontext if ctx is base else base
                with ctx():
                    rows += concept_rows(Runner(lm, splice, judge, cfg, mode, scorer), p, suite, sae, methods, name)
    finally:
        splice.remove()
    result = {"config": asdict(cfg), "sae": sae.describe(), "judge_accuracy": accuracy, "plans": plans,
              "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    if cfg.out:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "results.json").write_text(json.dumps(result, indent=1))
    return result
