"""Pilot (recorded; not rerun by CI): the demo adapter's recipe on the mixture, chosen on validation.

The demo recipe (layers after the SAE, lr 2e-3, 200 steps of 2 x 128 tokens) was chosen on Wikipedia with the
Wikipedia-only SAE. Around the SAE trained on the mixture it closed 17.7% of the gap on 32 validation rows of
the mixture, so the recipe is chosen again here, at the same budget (200 steps: the demo's time), over the
layers adapted and the learning rate. Every run is evaluated on the same validation rows of the mixture (the
demo's 3% band); the test band is not read.

    python bench/adapter_recipe_pilot.py --grid after:0.002 after:0.004 after:0.008 all:0.001 all:0.002

Runs are trained once into $SAELORA_CACHE/runs/recipe-pilot-<model>-<layers>-<lr>/ and reused; the results
merge into bench/results/adapter_recipe_pilot.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "adapter_recipe_pilot.json"
log = logging.getLogger("bench.adapter_recipe_pilot")


def one(model: str, sae: Path, layers: str, lr: float, steps: int, rows: int, seed: int = 0) -> dict:
    from saelora.adapters.bundle import has_manifest
    from saelora.adapters.config import cache_dir
    from saelora.demo import adapter_config
    from saelora.trainer.run_eval import EvalConfig, run_eval
    from saelora.trainer.train import train_lora

    out = cache_dir() / "runs" / f"recipe-pilot-{model}-{layers}-{lr:g}-{steps}{f'-s{seed}' if seed else ''}"
    t0 = time.perf_counter()
    if not has_manifest(out / "adapter"):
        cfg = adapter_config(model, sae, out, {"layers": layers, "lr": lr, "steps": steps}, eval_rows=8)
        train_lora(dataclasses.replace(cfg, seed=seed))
    train_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        (r,) = run_eval(EvalConfig(model=model, adapter=str(out / "adapter"), rows=rows,
                                   out=str(Path(tmp) / "eval.json"))).values()
    return {"layers": layers, "lr": lr, "steps": steps, "seed": seed, "train_seconds": round(train_s, 1),
            "val_rows": rows,
            "tokens": r["tokens"], "ce_base": r["ce_base"], "ce_spliced": r["ce_spliced"],
            "ce_adapted": r["ce_adapted"], "gap_closed": r["gap_closed"], "gap_closed_ci": r["gap_closed_ci"],
            "kl_spliced": r["kl_spliced"], "kl_adapted": r["kl_adapted"], "kl_adapter_only": r["kl_adapter_only"]}


def main(argv: list[str] | None = None) -> int:
    import torch

    from saelora.adapters.config import demo_dir

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sae", type=Path, help="SAE folder (default: the demo's, i.e. the shipped SAE)")
    p.add_argument("--grid", nargs="+", required=True, help="LAYERS:LR settings, e.g. after:0.002 all:0.001")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rows", type=int, default=96, help="validation rows of 128 tokens of the mixture")
    p.add_argument("--seed", type=int, default=0, help="the training seed (LoRA init, data order); the evaluation "
                   "rows stay the same")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    sae = args.sae or demo_dir(args.model) / "sae"
    results = json.loads(OUT.read_text()) if OUT.is_file() else []
    for setting in args.grid:
        layers, lr = setting.split(":")
        r = {"model": args.model, **one(args.model, sae, layers, float(lr), args.steps, args.rows, args.seed)}
        log.info("%s", json.dumps(r))
        key = _key(r)
        results = [x for x in results if _key(x) != key] + [r]
        OUT.write_text(json.dumps(results, indent=1))
    for r in sorted(results, key=_key):
        print(f"{r['model']} {r['layers']:5s} lr {r['lr']:g} seed {r.get('seed', 0)} ({r['steps']} steps, "
              f"{r['train_seconds']:.0f} s): gap "
              f"closed {100 * r['gap_closed']:.1f}% [{100 * r['gap_closed_ci'][0]:.1f}, "
              f"{100 * r['gap_closed_ci'][1]:.1f}] on {r['tokens']} validation tokens; drift KL "
              f"{r['kl_adapter_only']:.3f}")
    return 0


def _key(r: dict) -> tuple:
    return r["model"], r["layers"], r["lr"], r["steps"], r.get("seed", 0)


if __name__ == "__main__":
    sys.exit(main())
