"""Auto-steer pilot (recorded; not rerun by CI): how auto-steer should choose its winner, decided on the
development concepts only, on both embedded models.

For each development concept, auto-steer runs as the benchmark runs it (its own prompts, judge and texts), and then
*every* candidate of its sweep is also scored the benchmark's way (its judge, the 12 evaluation prompts). Each rule
in `adapters.autosteer.PICKS` is then replayed on auto-steer's own summaries, and the benchmark's score of the
candidate it would have chosen is averaged over the concepts. The rule with the most on-concept generations within
the fluency bounds becomes `PICK`.

    python bench/autosteer_pilot.py --model smollm2-135m     # ~10 min: bench/results/autosteer_pilot_<model>.json
    python bench/autosteer_pilot.py --model gemma3-270m      # ~20 min
    python bench/autosteer_pilot.py --report                 # bench/results/autosteer_pilot.md from both
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).parent / "results"
log = logging.getLogger("bench.autosteer_pilot")
KEYS = ("concept", "fluency_gap", "distinct2", "success")


def run(model: str, samples: int, strengths: tuple[float, ...] | None = None, tag: str = "") -> Path:
    import torch

    from saelora.adapters.autosteer import auto_steer
    from saelora.adapters.models import load_model
    from saelora.adapters.saes import load_sae
    from saelora.adapters.splice_hooks import Splice
    from saelora.trainer.concepts import DEV_CONCEPTS, load_suite
    from saelora.trainer.run_steer_eval import _max_act, _sae_folder
    from saelora.trainer.steer_eval import Runner, SteerEvalConfig, fit_judge, plan

    torch.set_num_threads(2)
    cfg = SteerEvalConfig(model=model, samples=samples)
    lm = load_model(model)
    folder = _sae_folder(model)
    sae = load_sae(lm.model, folder, tokenizer=lm.tokenizer)
    max_act = _max_act(lm, sae, folder)
    suite = load_suite("wiki")
    judge, _ = fit_judge(suite)
    splice = Splice(lm.model, [sae], mode="error_term").install()
    runner = Runner(lm, splice, judge, cfg, "error_term", contextlib.nullcontext)
    out = []
    path = RESULTS / f"autosteer_pilot_{model}{tag}.json"
    for concept in DEV_CONCEPTS:
        splice.remove()
        p = plan(lm, sae, suite, concept, max_act, cfg)
        splice.install()
        n = cfg.search_texts
        res = auto_steer(lm, splice, sae, suite.texts(concept, "search", n), suite.others(concept, "search", 2 * n),
                         seed=cfg.seed + 1000, **({"strengths": strengths} if strengths else {}))
        order: dict[tuple[str, int | None], int] = {}
        for c in res.candidates:
            b = runner.run(p, c.edits, suite.prompts)
            grid = order[(c.method, c.feature)] = order.get((c.method, c.feature), -1) + 1
            out.append({"model": model, "target": concept, "method": c.method, "feature": c.feature,
                        "latent_rank": len({f for m, f in order if m == "latent_add"}) - 1
                        if c.method == "latent_add" else None,
                        "strength": c.strength, "grid": grid,
                        "auto": {k: round(c.summary[k], 4) for k in KEYS},
                        "bench": {k: b[k] for k in KEYS}, "auto_seconds": round(res.seconds, 1)})
            log.info("%s %s %.3f auto %s bench %s", concept, c.method, c.strength, out[-1]["auto"], out[-1]["bench"])
        path.write_text(json.dumps(out, indent=1))  # after each concept: a stopped run keeps what it measured
    return path


#: Candidate subsets replayed on a run with 2 latents and 4 strengths (`--strengths 0.3 0.4 0.55 0.7`): what
#: auto-steer would have picked with fewer latents or without the lowest strength.
SUBSETS: dict[str, Callable[[dict], bool]] = {
    "2 latents, 4 strengths": lambda r: True,
    "1 latent, 4 strengths": lambda r: r["latent_rank"] in (None, 0),
    "2 latents, 3 strengths (v2)": lambda r: r["grid"] > 0,
    "1 latent, 3 strengths": lambda r: r["latent_rank"] in (None, 0) and r["grid"] > 0,
}


def replay(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per rule: the benchmark's mean score of the candidates the rule picks from auto-steer's own summaries."""
    from saelora.adapters.autosteer import PICKS, Candidate
    from saelora.adapters.steer_score import MAX_GAP

    out = {}
    for name, rule in PICKS.items():
        chosen = []
        for target in sorted({r["target"] for r in rows}):
            mine = [r for r in rows if r["target"] == target]
            # rows are in sweep order: latent 1, latent 2, DiffMean, 3 strengths each
            cands = [Candidate(r["method"], r["strength"], [], {**r["auto"], "n": 12},
                               r.get("feature", i // 3 if r["method"] == "latent_add" else None))
                     for i, r in enumerate(mine)]
            best = rule(cands, MAX_GAP)
            chosen.append(mine[cands.index(best)])
        out[name] = {k: round(sum(r["bench"][k] for r in chosen) / len(chosen), 3) for k in KEYS}
        out[name]["picked"] = [f"{r['target']}:{r['method']}@{r['strength']}" for r in chosen]
    return out


def report() -> None:
    from saelora.adapters.steer_score import MAX_GAP, MIN_DISTINCT

    lines = ["# Auto-steer pilot (development concepts)", "",
             "Written by `bench/autosteer_pilot.py --report`. Each rule replayed on auto-steer's own summaries; "
             "figures are the benchmark's scores (its judge, 12 prompts x 2 samples on SmolLM2, x 1 on Gemma 3) "
             "of the candidates picked, means over the development concepts listed. The Gemma 3 run was stopped "
             "after four of the five concepts to free the cores (its rows were saved from its log); it ran while "
             "other jobs shared the cores, hence its auto-steer times. `method_mean` was chosen on SmolLM2 alone, "
             "before the Gemma 3 rows existed. The `_v3` runs (`--samples 2 --strengths 0.3 0.4 0.55 0.7 --tag _v3`, "
             "2 samples on both models, 2 latents and DiffMean at four strengths) chose auto-steer v3: one latent, "
             "four strengths (decision 54).", ""]
    for path in sorted(RESULTS.glob("autosteer_pilot_*.json")):
        rows = json.loads(path.read_text())
        secs = sorted({r["auto_seconds"] for r in rows})
        lines += [f"## {path.stem.removeprefix('autosteer_pilot_')} (auto-steer {secs[0]:.0f}-{secs[-1]:.0f} s "
                  f"per concept)", ""]
        subsets = SUBSETS if len({r.get("grid") for r in rows}) > 3 else {"as run": lambda r: True}
        for label, keep in subsets.items():
            lines += [f"{label}:", "", "| rule | on-concept | success | fluency gap | distinct-2 | picked |",
                      "|---|---|---|---|---|---|"]
            for name, s in replay([r for r in rows if keep(r)]).items():
                lines.append(f"| {name} | {s['concept']:.2f} | {s['success']:.2f} | {s['fluency_gap']:+.2f} | "
                             f"{s['distinct2']:.2f} | {', '.join(s['picked'])} |")
            lines.append("")
        best = {}
        for r in rows:  # the oracle: the benchmark's best candidate within bounds, per concept
            if r["bench"]["fluency_gap"] <= MAX_GAP and r["bench"]["distinct2"] >= MIN_DISTINCT:
                best[r["target"]] = max(best.get(r["target"], 0.0), r["bench"]["concept"])
        lines += ["", f"Oracle (the benchmark's own best candidate within bounds, per concept): "
                      f"{sum(best.values()) / max(1, len(best)):.2f} on-concept.", ""]
    (RESULTS / "autosteer_pilot.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--samples", type=int, default=2, help="benchmark generations per prompt and candidate")
    p.add_argument("--strengths", type=float, nargs="+", help="auto-steer's grid (fractions of the spread)")
    p.add_argument("--tag", default="", help="suffix of the results file")
    p.add_argument("--report", action="store_true")
    args = p.parse_args(argv)
    if not args.report:
        run(args.model, args.samples, tuple(args.strengths) if args.strengths else None, args.tag)
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
