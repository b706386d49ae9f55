"""`saelora demo [--model M]`: the main job on an embedded model (default SmolLM2-135M), end to end.

1. prepares the embedded model and corpus (dequantised once into the cache);
2. copies the SAE shipped for the model (its held-out quality in its cfg.json) into $SAELORA_CACHE/demo/<model>,
   or trains one there with `train-sae`'s defaults, and trains, or reuses from there, a LoRA adapter around it,
   spliced under the SAE's position policy;
3. writes the SAE's feature descriptions;
4. starts `saelora serve` on 127.0.0.1 and runs a scripted client session: the top latents of a prompt,
   a steered and an unsteered completion side by side, a hot-loaded adapter and the CE gap it closes;
5. stops the server.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from saelora.launch import ServeProcess
    from saelora.trainer.config import TrainConfig

log = logging.getLogger("saelora.demo")
PROMPT = "The capital of France is"


def _demo_sae(sae: Path, args: argparse.Namespace) -> None:
    """The demo's SAE: the one shipped for the model, else trained here with `train-sae`'s defaults (once)."""
    import shutil

    from saelora.adapters.saes import SHIPPED_SAES, shipped_sae
    from saelora.trainer.train_sae import SAETrainConfig, train_sae

    if args.model in SHIPPED_SAES:
        shutil.copytree(shipped_sae(args.model), sae, dirs_exist_ok=True)
        return
    log.info("no SAE is shipped for %s: training one with train-sae's defaults (once)", args.model)
    train_sae(SAETrainConfig(model=args.model, out=str(sae)))


# The demo adapter's recipe per embedded model, each from a measurement (2 x 128-token steps, cosine, warm-up 10):
# SmolLM2: chosen on 12k validation tokens of the mixture around the SAE trained on it (bench/results/
# adapter_recipe_pilot.json): all layers at 5e-4 closed 34.2% [29.1, 40.1], at 2.5e-4 32.1%, at 1e-3 33.9%, at 2e-3
# 31.8% (flat; the choice inside the grid); layers
# after at 2e-3, the choice on Wikipedia with the Wikipedia-only SAE (train_gap), 28.3%, at 4e-3 16.1%;
# Gemma 3: one pilot run (bench/results/gemma3_lora_pilot.json: 32.0% on validation, 30.5% on 8,128 test
# tokens, one seed); SmolLM2's recipe closed only 17.7% there.
ADAPTER_RECIPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {"layers": "all", "lr": 5e-4, "steps": 200},
    "gemma3-270m": {"layers": "all", "lr": 5e-4, "steps": 150},
}


def _adapter_recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The model's ADAPTER_RECIPES entry with the --lora-steps / --lora-lr the caller gave."""
    given = (("steps", getattr(args, "lora_steps", None)), ("lr", getattr(args, "lora_lr", None)))
    return {**ADAPTER_RECIPES[args.model], **{k: v for k, v in given if v is not None}}


def _recipe(args: argparse.Namespace) -> dict[str, Any]:
    """What the cached demo SAE, descriptions and adapter were built from: the shipped SAE's weights (or train-sae's
    defaults), the default corpus and the adapter's recipe."""
    import hashlib

    from saelora.adapters.config import DEFAULT_CORPUS
    from saelora.adapters.saes import SHIPPED_SAES, shipped_sae

    weights = shipped_sae(args.model) / "sae_weights.safetensors" if args.model in SHIPPED_SAES else None
    return {"sae": hashlib.sha256(weights.read_bytes()).hexdigest() if weights else "train-sae defaults",
            "corpus": DEFAULT_CORPUS, "adapter": _adapter_recipe(args), "rank": args.rank,
            "feature_rows": args.feature_rows}


def _drop_stale(work: Path, recipe: dict[str, Any]) -> None:
    """Remove a cached demo built from another recipe (a newly shipped SAE, another default corpus)."""
    import json
    import shutil

    stamp = work / "recipe.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return
    if (work / "sae").exists() or (work / "adapter").exists():
        log.warning("the cached demo in %s was built from another recipe: building it again", work)
    for part in ("sae", "adapter", "lora-run"):
        shutil.rmtree(work / part, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(recipe, indent=1))


def _prepare(work: Path, args: argparse.Namespace, phases: dict[str, float]) -> tuple[Path, Path]:
    """The demo's SAE, its descriptions and its adapter, each built once; the seconds each took go in `phases`."""
    from saelora.adapters.bundle import has_manifest
    from saelora.adapters.config import descriptions_file
    from saelora.trainer.features import FeaturesConfig, run_features
    from saelora.trainer.train import train_lora

    _drop_stale(work, _recipe(args))
    sae, adapter = work / "sae", work / "adapter"
    t0 = time.perf_counter()
    if not (sae / "cfg.json").is_file():
        _demo_sae(sae, args)
    if not descriptions_file(sae).is_file():  # the first model load: dequantise it, pack the corpus
        run_features(FeaturesConfig(model=args.model, saes=[str(sae)], rows=args.feature_rows, top_n=8))
    phases["SAE and its descriptions"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if not has_manifest(adapter):
        recipe = _adapter_recipe(args)
        log.info("training the demo adapter (once): %s", recipe)
        train_lora(adapter_config(args.model, sae, work / "lora-run", recipe, rank=args.rank,
                                  eval_rows=args.eval_rows))
        (work / "lora-run" / "adapter").replace(adapter)
    phases["the adapter"] = time.perf_counter() - t0
    return sae, adapter


def adapter_config(model: str, sae: Path, out: Path, recipe: dict[str, Any], rank: int = 64, eval_rows: int = 32,
                   corpus: list[str] | None = None) -> "TrainConfig":
    """The demo adapter's training run (also the generalisation studies': bench/leave_one_out.py): `recipe` from
    ADAPTER_RECIPES, on `corpus` (default: the default corpus), 2 x 128-token steps, cosine, warm-up 10, the
    demo's hash bands (3% validation, 7% test)."""
    from saelora.trainer.config import LoraSettings, TrainConfig

    return TrainConfig(model=model, saes=[str(sae)], out=str(out), **({"corpus": corpus} if corpus else {}),
                       lora=LoraSettings(rank=rank, alpha=32, layers=recipe["layers"]), lr=recipe["lr"],
                       max_steps=recipe["steps"], schedule="cosine", warmup_steps=10, batch_size=2, seq_len=128,
                       eval_interval=0, eval_rows=eval_rows, val_fraction=0.03, test_fraction=0.07,
                       checkpoint_interval=0)


def _server(sae: Path, work: Path, args: argparse.Namespace) -> "ServeProcess":
    from saelora.launch import ServeProcess

    # --engine vllm: keep vLLM's start-up log out of the report unless the caller set a level
    env = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    return ServeProcess(["--model", args.model, "--sae", str(sae), "--adapter-root", str(work), "--engine",
                         args.engine], env=env)


def _session(url: str, adapter: Path, model: str) -> None:
    from saelora.adapters.bundle import read_manifest
    from saelora.adapters.policy import PositionPolicy
    from saelora.clients import SaeloraClient
    from saelora.clients.endpoints import kept_by_policy

    c = SaeloraClient(url)
    sae = c.saes.list().data[0]
    print(f"\n== server {url}: model {c.default_model()}, SAE {sae.id} ({sae.architecture}, {sae.d_sae} latents)")
    feats = c.features(PROMPT, top_k=3)
    print(f"\n== top latents of {PROMPT!r}")
    for t in feats.tokens:
        lat = ", ".join(f"#{i} {v:.1f}" for f in t.features for i, v in zip(f.indices, f.values, strict=True))
        kept = "  (left original: the SAE's policy keeps it)" if kept_by_policy(sae.policy, t) else ""
        print(f"  {t.token!r:>12}  {lat}{kept}")
    _steer(c, sae.id, model)
    manifest = read_manifest(adapter)
    c.adapters.load("demo", adapter.name)
    adapted = c.complete(PROMPT, model="demo", max_tokens=12, temperature=0, sae={"mode": "replace"}).choices[0].text
    spliced = c.complete(PROMPT, max_tokens=12, temperature=0, sae={"mode": "replace"}).choices[0].text
    base = c.complete(PROMPT, max_tokens=12, temperature=0).choices[0].text
    final = manifest.metrics["final"]
    policy = PositionPolicy.from_json(manifest.saes[0]["policy"])
    print(f"\n== adapter 'demo' hot-loaded ({manifest.lora['r']}-rank LoRA, layers {manifest.lora['layers']}, "
          f"{manifest.training['train_seconds'] / 60:.1f} min of training)")
    print(f"  base model:           {base!r}\n  SAE spliced:          {spliced!r}\n  SAE spliced+adapter:  "
          f"{adapted!r}")
    print(f"  SAE spliced at {policy.describe()}")
    print(f"  held-out CE ({final['tokens']} tokens): base {final['ce_base']:.3f}, spliced {final['ce_spliced']:.3f}, "
          f"spliced+adapter {final['ce_adapted']:.3f} -> the adapter closes {final['gap_closed']:.1%} of the SAE's "
          "CE gap")
    c.adapters.unload("demo")
    c.close()


STEER_CONCEPT = "astronomy"  # a concept with everyday texts written in the repo (saelora/data/concepts/casual.json)
STEER_PROMPT = "Yesterday I"


def _steer(c: Any, sae: str, model: str) -> None:
    """Auto-steer from the repo's texts of one concept (torch engine); on vLLM, which cannot run it, the same
    preset made by hand from concept search: the best latent, `add` 0.4 of the residual norm (the benchmark's
    calibrated default, docs/steering.md)."""
    import json

    from saelora.adapters.autosteer import casual_texts_path
    from saelora.clients import Edit, InvalidRequestError

    texts = json.loads(casual_texts_path().read_text(encoding="utf-8"))
    pos, neg = texts[STEER_CONCEPT], texts["none"]
    top = c.contrast(pos, neg, n=1)[0]
    desc = c.feature(sae, top["feature"])
    print(f"\n== steering towards {STEER_CONCEPT!r} ({len(pos)} example texts written in the repo)")
    print(f"  concept search (standardised mean difference): latent #{top['feature']}, fires on "
          f"{', '.join(repr(x['token']) for x in desc.top[:4])}; promotes "
          f"{', '.join(repr(t.token) for t in (desc.logits.promoted[:4] if desc.logits else []))}")
    try:
        auto = c.auto_steer("demo-steer", pos, neg)
        m = auto.measured
        print(f"  auto-steer chose {m['method']} at {m['strength']:.2f} x the residual norm in {auto.seconds:.0f} s: "
              f"{m['concept']:.0%} of its generations on-concept, fluency gap {m['fluency_gap']:+.2f} nat, "
              f"distinct-2 {m['distinct2']:.2f} (its own judge; preset demo-steer)")
    except InvalidRequestError:
        c.presets.put("demo-steer", [Edit.add(top["feature"], 0.4, unit="norm")])
        print(f"  preset demo-steer: add 0.4 x the residual norm along #{top['feature']} (auto-steer needs the "
              "torch engine)")
    cmp = c.compare(STEER_PROMPT, preset="demo-steer", max_tokens=32, top_k=4)  # one call, greedy
    print(f"  unsteered: {cmp['default']!r}\n  steered:   {cmp['steered']!r}  (both in one compare call)")
    print("  " + _bench_judge(model, cmp["steered"], cmp["default"]))


def _bench_judge(model: str, steered: str, unsteered: str) -> str:
    """The steered and unsteered texts scored the benchmark's way (trainer/steer_eval.py): its judge, fitted on
    Wikipedia leads (none of the repo's texts auto-steer read), the fluency gap under the unsteered model against
    its CE on held-out leads of the concept, and distinct-2."""
    from saelora.adapters.models import load_model
    from saelora.adapters.steer_score import MAX_GAP, MIN_DISTINCT, continuation_ce, reference_ce, score
    from saelora.adapters.steer_score import Generation as Gen
    from saelora.trainer.concepts import wiki_suite
    from saelora.trainer.steer_eval import fit_judge

    suite = wiki_suite()
    judge, _ = fit_judge(suite)
    lm = load_model(model, device="cpu")
    prompt = lm.tokenizer(STEER_PROMPT)["input_ids"]
    gens = [Gen(STEER_PROMPT, prompt, lm.tokenizer(t, add_special_tokens=False)["input_ids"], t)
            for t in (steered, unsteered)]
    bos = lm.tokenizer.bos_token_id if prompt[:1] == [lm.tokenizer.bos_token_id] else None
    ref = reference_ce(lm.model, lm.tokenizer, suite.texts(STEER_CONCEPT, "test", 48), bos=bos)
    s = score(gens, continuation_ce(lm.model, gens), judge, STEER_CONCEPT, ref)
    ok = s.success()[0]
    return (f"the benchmark's judge: steered {s.concept[0]:.2f} {STEER_CONCEPT} (unsteered {s.concept[1]:.2f}), "
            f"fluency gap {s.gap[0]:+.2f} nat (bound {MAX_GAP}), distinct-2 {s.distinct[0]:.2f} (bound "
            f"{MIN_DISTINCT}): {'on-concept and fluent' if ok else 'NOT a success by the benchmark'}")


def run(args: argparse.Namespace) -> int:
    from saelora.adapters.config import demo_dir

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the report
    t0, phases = time.perf_counter(), {}
    work = demo_dir(args.model)
    work.mkdir(parents=True, exist_ok=True)
    sae, adapter = _prepare(work, args, phases)
    t1 = time.perf_counter()
    with _server(sae, work, args) as srv:
        _session(srv.url, adapter, args.model)
    phases["server and session"] = time.perf_counter() - t1
    parts = ", ".join(f"{name} {s:.0f} s" for name, s in phases.items())
    print(f"\n== demo finished in {time.perf_counter() - t0:.0f} s: {parts} (artifacts in {work})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from saelora.adapters.config import DEFAULT_MODEL
    from saelora.adapters.models import EMBEDDED_MODELS

    p = sub.add_parser("demo", help="the main job on the embedded default: SAE, adapter, server, client session",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(EMBEDDED_MODELS),
                   help=f"embedded model (default {DEFAULT_MODEL}); artifacts go to $SAELORA_CACHE/demo/<model>")
    p.add_argument("--lora-steps", type=int, help="adapter training steps of 2 x 128 tokens, cosine decay "
                   "(default: the model's recipe, ADAPTER_RECIPES; another value builds the cached demo again)")
    p.add_argument("--lora-lr", type=float, help="adapter learning rate (default: the model's recipe)")
    p.add_argument("--rank", type=int, default=64, help="adapter LoRA rank (default 64, the paper's)")
    p.add_argument("--eval-rows", type=int, default=32, help="held-out rows of 128 tokens for the adapter's final "
                   "eval (default 32)")
    p.add_argument("--feature-rows", type=int, default=128, help="corpus rows scanned for feature descriptions")
    p.add_argument("--engine", choices=("torch", "vllm"), default="torch", help="serving engine for the client "
                   "session (default torch; vllm: the same session on vLLM, see docs/vllm.md)")
    p.set_defaults(func=run)
