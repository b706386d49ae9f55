"""Does the gap closed on an unseen genre grow with the adapter's token budget? The leave-one-genre-out setting with
the genre held out of the SAE too (bench/leave_one_out.py --sae-too), the demo's adapter recipe at several step
budgets (2 x 128 tokens a step, cosine over each budget; nothing else changed, the learning rate included), each
evaluated on the left-out genre's validation band. The test band stays as leave_one_out.py read it, once.

    python bench/leave_one_out.py --genres wiki --sae-too --sae cli/data/saes/smollm2-135m-L12-topk   # first
    python bench/adapter_tokens.py --genre wiki --steps 200 400 800      # ~60 min alone on 2 cores

The run at the demo's own budget is leave_one_out.py's adapter, reused. Results: bench/results/adapter_tokens.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from generalisation import GENRES, RESULTS, _ci, run
from leave_one_out import runs_without, train_without

OUT = RESULTS / "adapter_tokens.json"
log = logging.getLogger("bench.adapter_tokens")


def own_genres_gap(adapter: str) -> str:
    """Gap closed at the training run's last evaluation (its own genres' validation rows, 32 x 128 tokens)."""
    from saelora.trainer.evaluate import gap_closed

    evals = [json.loads(line)["eval"] for line in (Path(adapter).parent / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    if not evals:
        return ""
    e = evals[-1]
    return f"{100 * gap_closed(e['ce_base'], e['ce_spliced'], e['ce_adapted']):.1f}%"


def report() -> None:
    results = json.loads(OUT.read_text())
    lines = ["# Gap closed on an unseen genre against the adapter's token budget", "",
             "Written by `bench/adapter_tokens.py`. SAE and adapter both trained without the genre (the SAE by "
             "`bench/leave_one_out.py --sae-too`); the demo's adapter recipe (all layers, lr 5e-4, cosine, 2 x 128 "
             "tokens a step) at each step budget; the left-out genre's validation band; one seed per budget (the "
             "interval is a 95% bootstrap over rows, not over training runs). The last column is the training run's "
             "own last evaluation, on the validation rows of the genres it trained on (no interval).", "",
             "| genre left out | steps | adapter tokens | training s | CE spliced | CE adapted | gap closed "
             "| drift CE | gap closed on its own genres (4,064 tokens) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["genre"], r["steps"])):
        c = r["corpora"][r["genre"]]
        secs = f"{r['train_s']:.0f}" if r.get("train_s") else "(reused)"
        lines.append(f"| {r['genre']} | {r['steps']} | {r['steps'] * 256:,} | {secs} | {c['ce_spliced']:.3f} | "
                     f"{c['ce_adapted']:.3f} | {100 * c['gap_closed']:.1f}%{_ci(c, 'gap_closed', 100)} | "
                     f"{c['drift_ce']:+.3f} | "
                     f"{own_genres_gap(r['adapter'])} |")
    (RESULTS / "adapter_tokens.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    from saelora.adapters.bundle import has_manifest
    from saelora.demo import ADAPTER_RECIPES

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--genre", default="wiki", choices=GENRES, help="the genre left out of the SAE and the adapter")
    p.add_argument("--steps", type=int, nargs="+", default=[200, 400, 800], help="adapter step budgets")
    p.add_argument("--rows", type=int, default=128, help="validation rows of 128 tokens evaluated")
    p.add_argument("--report", action="store_true", help="only write the table from the results file")
    args = p.parse_args(argv)
    if not args.report:
        runs = runs_without(args.model, args.genre)
        sae = runs.with_name(runs.name + "-sae")
        if not (sae / "cfg.json").is_file():
            p.error(f"no SAE trained without {args.genre} in {sae}: run bench/leave_one_out.py --sae-too first")
        for steps in args.steps:
            own = steps == ADAPTER_RECIPES[args.model]["steps"]
            out = runs.with_name(runs.name + "-sae-adapter" + ("" if own else f"-{steps}"))
            reused, t0 = has_manifest(out / "adapter"), time.perf_counter()
            adapter = train_without(args.model, sae, args.genre, out, steps=steps)
            extra = {"genre": args.genre, "steps": steps, "train_s": None if reused else time.perf_counter() - t0}
            r = run(args.model, args.rows, f"without {args.genre}, {steps} steps", adapter, "val", (args.genre,),
                    out_file=OUT, extra=extra)
            log.info("%d steps: gap closed %.3f", steps, r["corpora"][args.genre]["gap_closed"])
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
