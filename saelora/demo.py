"""`saelora demo`: the main job on the embedded default, end to end.

1. prepares the embedded model and corpus (dequantised once into the cache);
2. trains, or reuses from $SAELORA_CACHE/demo, a TopK SAE at a middle layer and a LoRA adapter around it;
3. writes the SAE's feature descriptions;
4. starts `saelora serve` on 127.0.0.1 and runs a scripted client session: the top latents of a prompt,
   a steered and an unsteered completion side by side, a hot-loaded adapter and the CE gap it closes;
5. stops the server.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from saelora.launch import ServeProcess

log = logging.getLogger("saelora.demo")
PROMPT = "The capital of France is"


def _prepare(work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    from saelora.trainer.config import TrainConfig
    from saelora.trainer.features import FeaturesConfig, run_features
    from saelora.trainer.train import train_lora
    from saelora.trainer.train_sae import SAETrainConfig, train_sae

    sae, adapter = work / "sae", work / "adapter"
    if not (sae / "cfg.json").is_file():
        log.info("training the demo SAE (once; %d tokens)", args.sae_tokens)
        train_sae(SAETrainConfig(hook=f"blocks.{args.layer}.hook_resid_post", d_sae=args.d_sae, k=32,
                                 tokens=args.sae_tokens, out=str(sae)))
    if not (sae / "features" / "features.json").is_file():
        run_features(FeaturesConfig(saes=[str(sae)], rows=args.feature_rows, top_n=8))
    if not (adapter / "saelora.json").is_file():
        log.info("training the demo adapter (once; %.1f min)", args.lora_minutes)
        train_lora(TrainConfig(saes=[str(sae)], out=str(work / "lora-run"), layers="after", rank=16, alpha=32,
                               lr=1e-3, max_minutes=args.lora_minutes, eval_interval=0, eval_rows=8,
                               checkpoint_interval=0))
        (work / "lora-run" / "adapter").replace(adapter)
    return sae, adapter


def _server(sae: Path, work: Path, engine: str) -> "ServeProcess":
    from saelora.launch import ServeProcess

    # --engine vllm: keep vLLM's start-up log out of the report unless the caller set a level
    env = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    return ServeProcess(["--sae", str(sae), "--adapter-root", str(work), "--engine", engine], env=env)


def _session(url: str, adapter: Path) -> None:
    from saelora.clients import Edit, SaeloraClient

    c = SaeloraClient(url)
    sae = c.saes.list().data[0]
    print(f"\n== server {url}: model {c.default_model()}, SAE {sae.id} ({sae.architecture}, {sae.d_sae} latents)")
    feats = c.features(PROMPT, top_k=3)
    print(f"\n== top latents of {PROMPT!r}")
    for t in feats.tokens:
        lat = ", ".join(f"#{i} {v:.1f}" for f in t.features for i, v in zip(f.indices, f.values, strict=True))
        print(f"  {t.token!r:>12}  {lat}")
    contrast = c.contrast(["Paris is the capital of France.", "The Eiffel Tower is in Paris.", "French wine"],
                          ["The cat sat on the mat.", "Water boils at 100 degrees.", "He plays the guitar."], n=3)
    steer = contrast[0]["feature"]
    desc = c.feature(sae.id, steer)
    examples = ", ".join(repr(x["token"]) for x in desc.top[:4])
    print(f"\n== steering latent #{steer} (the most France-specific in a contrast; fires on {examples})")
    value = 2 * (desc.max or 4.0)  # twice its strongest activation on the corpus
    cmp = c.compare("My favourite place to visit is", [Edit.set(steer, value, positions="generated")],
                    max_tokens=24, top_k=4)
    print(f"  unsteered: {cmp['default']!r}\n  steered:   {cmp['steered']!r}  (set #{steer} = {value:.1f})")
    manifest = json.loads((adapter / "saelora.json").read_text())
    c.adapters.load("demo", adapter.name)
    adapted = c.complete(PROMPT, model="demo", max_tokens=12, temperature=0, sae={"mode": "replace"}).choices[0].text
    spliced = c.complete(PROMPT, max_tokens=12, temperature=0, sae={"mode": "replace"}).choices[0].text
    base = c.complete(PROMPT, max_tokens=12, temperature=0).choices[0].text
    final = manifest["metrics"]["final"]
    print(f"\n== adapter 'demo' hot-loaded ({manifest['lora']['r']}-rank LoRA, layers {manifest['lora']['layers']})")
    print(f"  base model:           {base!r}\n  SAE spliced:          {spliced!r}\n  SAE spliced+adapter:  "
          f"{adapted!r}")
    print(f"  held-out CE: base {final['ce_base']:.3f}, spliced {final['ce_spliced']:.3f}, spliced+adapter "
          f"{final['ce_adapted']:.3f} -> the adapter closes {final['gap_closed']:.1%} of the SAE's CE gap")
    c.adapters.unload("demo")
    c.close()


def run(args: argparse.Namespace) -> int:
    from saelora.adapters.config import cache_dir

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the report
    t0 = time.time()
    work = cache_dir() / "demo"
    work.mkdir(parents=True, exist_ok=True)
    sae, adapter = _prepare(work, args)
    with _server(sae, work, args.engine) as srv:
        _session(srv.url, adapter)
    print(f"\n== demo finished in {time.time() - t0:.0f} s (artifacts in {work})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded default: SAE, adapter, server, client session",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", type=int, default=12, help="SAE at blocks.LAYER.hook_resid_post (default 12)")
    p.add_argument("--d-sae", type=int, default=4608, help="SAE latents (default 4608)")
    p.add_argument("--sae-tokens", type=int, default=300_000, help="SAE training tokens, first run (default 300000)")
    p.add_argument("--lora-minutes", type=float, default=4.0, help="adapter training minutes, first run (default 4)")
    p.add_argument("--feature-rows", type=int, default=128, help="corpus rows scanned for feature descriptions")
    p.add_argument("--engine", choices=("torch", "vllm"), default="torch", help="serving engine for the client "
                   "session (default torch; vllm: the same session on vLLM, see docs/vllm.md)")
    p.set_defaults(func=run)
