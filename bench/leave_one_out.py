"""Leave one genre out: for each genre of the broad corpus, a LoRA adapter trained with the demo's recipe on the
other genres only, then evaluated on the test band of the genre it never saw (and, with --all-genres, of the
others), beside the demo adapter trained on the whole mixture.

    saelora corpus-fetch                                          # once: the tech and narrative genres
    python bench/leave_one_out.py --model smollm2-135m            # ~35 min on 2 cores: 3 adapters + 3 evaluations
    python bench/generalisation.py --report                       # the tables, in bench/results/generalisation.md

The SAE is the one given (default: the shipped SAE of the model, copied in the demo's cache): it was trained on
the whole mixture, so only the adapter is held out of the genre. With --sae-too the genre is held out of the SAE as
well: an SAE is trained with the shipped SAE's own recipe (its cfg.json `train_config`: 1M activations, 3 epochs,
~50 min on 2 cores) on the other genres, and the adapter is trained around it; the setting is then
"SAE and adapter trained without <genre>". The test bands are the demo adapter's (7% of each
genre's documents by hash), never trained on by the SAE (its 12% held-out band contains them) or any adapter.
Each adapter is trained once into $SAELORA_CACHE/runs/ and reused; results merge into
bench/results/generalisation.json under the setting "adapter trained without <genre>".
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from generalisation import GENRES, report, run

log = logging.getLogger("bench.leave_one_out")


def runs_without(model: str, genre: str) -> Path:
    """The run folder of an adapter trained without `genre`; its SAE held out too: + "-sae" (and "-sae-adapter")."""
    from saelora.adapters.config import cache_dir

    return cache_dir() / "runs" / f"logo-{model}-without-{genre}"


def train_without(model: str, sae: Path, genre: str, out: Path, seed: int = 0, steps: int | None = None) -> Path:
    """The demo's adapter recipe on every genre but `genre` (trained once into `out`), with training seed `seed`
    and `steps` steps (default: the recipe's)."""
    from dataclasses import replace

    from saelora.adapters.bundle import has_manifest
    from saelora.demo import ADAPTER_RECIPES, adapter_config
    from saelora.trainer.train import train_lora

    adapter = out / "adapter"
    if has_manifest(adapter):
        log.info("reusing %s", adapter)
        return adapter
    corpus = [g for g in GENRES if g != genre]
    t0 = time.perf_counter()
    recipe = {**ADAPTER_RECIPES[model], **({"steps": steps} if steps else {})}
    train_lora(replace(adapter_config(model, sae, out, recipe, corpus=corpus), seed=seed))
    log.info("adapter without %s (trained on %s): %.0f s", genre, "+".join(corpus), time.perf_counter() - t0)
    return adapter


def sae_without(model: str, shipped: Path, genre: str, out: Path) -> Path:
    """The shipped SAE's recipe (its cfg.json train_config, nothing retyped) on every genre but `genre` (once)."""
    from saelora.trainer.train_sae import SAETrainConfig, train_sae

    if (out / "cfg.json").is_file():
        log.info("reusing %s", out)
        return out
    recipe = json.loads((shipped / "cfg.json").read_text())["metadata"]["train_config"]
    cfg = SAETrainConfig(**{**recipe, "model": model, "out": str(out), "corpus": [g for g in GENRES if g != genre]})
    t0 = time.perf_counter()
    _, quality = train_sae(cfg)
    log.info("SAE without %s: %.0f s, held-out quality on %s %s", genre, time.perf_counter() - t0,
             "+".join(cfg.corpus), quality)
    return out


def main(argv: list[str] | None = None) -> int:
    from saelora.adapters.config import demo_dir

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sae", type=Path, help="SAE folder (default: the demo's, i.e. the shipped SAE)")
    p.add_argument("--genres", nargs="+", default=list(GENRES), choices=GENRES, help="genres to leave out, in turn")
    p.add_argument("--rows", type=int, default=128, help="test rows of 128 tokens per genre evaluated")
    p.add_argument("--sae-too", action="store_true", help="hold the genre out of the SAE as well: train one with "
                   "the shipped SAE's recipe on the other genres (~50 min each on 2 cores)")
    p.add_argument("--seed", type=int, default=0, help="the adapter's training seed (not 0: its own run folder and "
                   "setting name; the SAE is the same)")
    p.add_argument("--all-genres", action="store_true", help="evaluate each adapter on every genre, not only the "
                                                             "one it never saw")
    args = p.parse_args(argv)
    sae = args.sae or demo_dir(args.model) / "sae"
    for genre in args.genres:
        runs = runs_without(args.model, genre)
        seeded = f"-seed{args.seed}" if args.seed else ""
        if args.sae_too:
            held_sae = sae_without(args.model, sae, genre, runs.with_name(runs.name + "-sae"))
            adapter = train_without(args.model, held_sae, genre, runs.with_name(runs.name + "-sae-adapter" + seeded),
                                    args.seed)
            setting = f"SAE and adapter trained without {genre}"
        else:
            adapter = train_without(args.model, sae, genre, runs.with_name(runs.name + seeded), args.seed)
            setting = f"adapter trained without {genre} (SAE on the mixture)"
        setting += f", adapter seed {args.seed}" if args.seed else ""
        genres = (genre, *[g for g in GENRES if g != genre]) if args.all_genres else (genre,)
        run(args.model, args.rows, setting, adapter, "test", genres)
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
