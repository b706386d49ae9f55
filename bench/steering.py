"""Steering benchmark (`saelora steer-eval`) on the embedded models, and its report.

    python bench/steering.py --model smollm2-135m [--adapter]   # ~40 min: bench/results/steering_smollm2-135m.json
    python bench/steering.py --model gemma3-270m --concepts test --samples 1 --norm-grid 0.05 0.07 0.093 \
        --methods none prompt latent_add diffmean auto            # Gemma 3 (its SAE: the demo's), ~18 min; its
                                                                  # strengths were chosen on DEV_CHOICES' rows
    python bench/steering.py --model smollm2-135m --concepts test --methods auto --merge  # auto-steer again
    python bench/steering.py --report                             # steering.{json,md,png} from every run above

Protocol (docs/steering.md): concepts and their text parts are fixed by rules (trainer/concepts.py); each swept
method's strength is chosen on the development concepts and reported once on the test concepts; auto-steer
chooses per concept from the search texts alone, with its own prompts and judge, and is scored by the benchmark's
judge on the evaluation prompts. `--adapter` adds the spliced and adapted conditions with the demo adapter.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
#: Strengths (norm) chosen on a model's development concepts outside its benchmark run, for a run on the test
#: concepts alone. Gemma 3, by the report's rule (most successes, then the smaller gap) over its development rows:
#: the auto-steer pilot's candidates (0.093-0.164 norm, astronomy, law, medicine, music; every latent setting
#: there was past the 0.5-nat gap on average) and a stopped grid run's astronomy rows (0.05-0.2 norm, log only):
#: latent add 0.05 (astronomy: 0.58 success, against 0.42 at 0.07), DiffMean 0.093 (pilot: 0.46 success, against
#: 0.25 and 0.10 at 0.128 and 0.164; astronomy: best at 0.10).
DEV_CHOICES: dict[str, dict[str, float]] = {"gemma3-270m": {"latent_add": 0.05, "diffmean": 0.093}}
log = logging.getLogger("bench.steering")


def run(model: str, adapter: bool, concepts: str, methods: list[str] | None, samples: int,
        adapter_methods: list[str] | None, grid_scale: float = 1.0, merge: bool = False,
        norm_grid: list[float] | None = None) -> Path:
    from saelora.adapters.config import cache_dir
    from saelora.trainer.concepts import DEV_CONCEPTS, WIKI_CONCEPTS
    from saelora.trainer.run_steer_eval import run_steer_eval
    from saelora.trainer.steer_eval import METHODS, SteerEvalConfig

    chosen = {"all": list(WIKI_CONCEPTS), "dev": list(DEV_CONCEPTS),
              "test": [c for c in WIKI_CONCEPTS if c not in DEV_CONCEPTS]}[concepts]
    bundle = cache_dir() / "demo" / model / "adapter"
    if adapter and not bundle.is_dir():
        raise SystemExit(f"no demo adapter at {bundle}: run `saelora demo --model {model}` first")
    cfg = SteerEvalConfig(model=model, adapter=str(bundle) if adapter else None, concepts=chosen,
                          methods=methods or list(METHODS), samples=samples, grid_scale=grid_scale,
                          norm_grid=norm_grid or [],
                          adapter_methods=adapter_methods or ["none", "latent_add", "project"])
    result = run_steer_eval(cfg)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"steering_{model}.json"
    if merge and out.is_file():
        result = _merged(json.loads(out.read_text()), result)
    out.write_text(json.dumps(result, indent=1))
    log.info("wrote %s (%.0f s)", out, result["seconds"])
    return out


def _merged(old: dict, new: dict) -> dict:
    """`new`'s rows replace `old`'s of the same condition, concept and method; the rest of `old` stays. Each run's
    config is kept under `runs` (a method rerun after a change says so there)."""
    key = lambda r: (r["condition"], r["target"], r["method"])  # noqa: E731
    redone = {key(r) for r in new["rows"]}
    runs = old.get("runs", [{"config": old["config"], "seconds": old["seconds"]}])
    return {**old, "rows": [r for r in old["rows"] if key(r) not in redone] + new["rows"],
            "plans": {**old["plans"], **new["plans"]}, "seconds": old["seconds"] + new["seconds"],
            "runs": runs + [{"config": new["config"], "seconds": new["seconds"]}]}


def _auto_seconds(res: dict) -> list[float]:
    """Auto-steer's wall time per concept (min, max) over the test concepts."""
    from saelora.trainer.concepts import DEV_CONCEPTS

    secs = [r["auto"]["seconds"] for r in res["rows"] if r["method"] == "auto" and r["target"] not in DEV_CONCEPTS]
    return [min(secs), max(secs)] if secs else []


def _has_dev(res: dict) -> bool:
    from saelora.trainer.concepts import DEV_CONCEPTS

    return any(r["target"] in DEV_CONCEPTS for r in res["rows"])


def report() -> None:
    from saelora.trainer.steer_report import pareto_plot, summarise, table

    runs = {p.stem.removeprefix("steering_"): json.loads(p.read_text())
            for p in sorted(RESULTS.glob("steering_*.json")) if p.stem != "steering_pilot"}
    summary, md = {"auto_steer": {}, "models": {}}, ["# Steering benchmark", ""]
    chosen: dict[str, float] = {}  # a run without development concepts takes the first run's choices
    for model, res in sorted(runs.items(), key=lambda kv: not _has_dev(kv[1])):
        conds = sorted({r["condition"] for r in res["rows"]})
        fixed = None if _has_dev(res) else DEV_CHOICES.get(model, chosen)
        summary["models"][model] = {c: summarise(res["rows"], c, fixed=fixed) for c in conds}
        if not chosen:
            chosen = {m: s["strength"] for m, s in summary["models"][model]["base"].items() if s["strength"]}
        base = summary["models"][model]["base"]
        if "auto" in base:
            summary["auto_steer"][model] = {k: base["auto"][k] for k in ("concept", "fluency_gap", "distinct2",
                                                                         "success", "concepts", "n")
                                            if k in base["auto"]} | {"fluency_gap": base["auto"]["gap"],
                                                                      "seconds": _auto_seconds(res)}
        acc = res["judge_accuracy"]
        md += [f"## {model} (SAE {res['sae']['name']}, {res['seconds'] / 60:.0f} min)", "",
               "Judge on the test texts (first 25 words): " + ", ".join(
                   f"{c} {a['recall']:.2f}/{a['false_positive']:.3f}" for c, a in acc.items()) +
               " (recall / false-positive rate).", ""]
        for i, r in enumerate(res.get("runs", [])[1:], start=2):  # methods rerun after a change (--merge)
            md += [f"Run {i} replaced {', '.join(r['config']['methods'])} on {', '.join(r['config']['concepts'])} "
                   f"({r['seconds'] / 60:.0f} min), after a change chosen on the development concepts "
                   "(docs/steering.md says which).", ""]
        for c in conds:
            md += [f"### condition: {c}", "", table(summary["models"][model][c]), ""]
    if runs:
        pareto_plot({m: r["rows"] for m, r in runs.items()}, str(RESULTS / "steering.png"))
    (RESULTS / "steering.json").write_text(json.dumps(summary, indent=1))
    (RESULTS / "steering.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapter", action="store_true", help="add the spliced and adapted conditions (demo adapter)")
    p.add_argument("--concepts", choices=("all", "dev", "test"), default="all")
    p.add_argument("--methods", nargs="*", default=None)
    p.add_argument("--adapter-methods", nargs="*", default=None, help="methods run in the spliced and adapted "
                   "conditions (default: none latent_add project)")
    p.add_argument("--samples", type=int, default=2, help="generations per prompt and setting")
    p.add_argument("--grid-scale", type=float, default=1.0, help="multiply the norm-unit grids (Gemma 3: 0.32, "
                   "its spread-to-norm ratio over SmolLM2's)")
    p.add_argument("--norm-grid", nargs="*", type=float, default=None, help="strengths (norm) for latent_add and "
                   "diffmean instead of their grids")
    p.add_argument("--merge", action="store_true", help="replace only this run's rows (condition, concept, "
                   "method) in the model's results file, keeping the others")
    p.add_argument("--report", action="store_true", help="only write steering.{json,md} from the runs' files")
    args = p.parse_args(argv)
    if not args.report:
        run(args.model, args.adapter, args.concepts, args.methods, args.samples, args.adapter_methods,
            args.grid_scale, args.merge, args.norm_grid)
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
