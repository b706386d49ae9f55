"""Generalisation of the method beyond its training text: each model's demo SAE and adapter evaluated on the
held-out band of every genre of the broad corpus (adapters/genres.py), CE cost of the splice beside FVU.

    saelora corpus-fetch                                     # once: the tech and narrative genres
    python bench/generalisation.py --model smollm2-135m      # ~8 min: bench/results/generalisation.json (merged)
    python bench/generalisation.py --model gemma3-270m       # ~15 min
    python bench/generalisation.py --report                  # bench/results/generalisation.md

Each run is recorded under a setting name (`--setting`, default: what the demo's SAE and adapter were trained
on, read from the adapter's manifest), so rows for SAEs and adapters trained on the mixture, or with a genre left
out, sit beside the Wikipedia-only baseline. The held-out bands are the hash bands the adapter was trained with:
no document of them was trained on by the adapter, and a genre the adapter never saw is unseen as a whole.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from saelora.adapters.genres import GENRE_NAMES as GENRES

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "generalisation.json"
log = logging.getLogger("bench.generalisation")


def run(model: str, rows: int, setting: str | None, adapter: Path | None = None, split: str = "val",
        genres: tuple[str, ...] = GENRES, sae: Path | None = None, out_file: Path = OUT,
        extra: dict | None = None) -> dict:
    """Evaluate `adapter` (default: the model's demo adapter) and its SAE (or `sae`, where the folder the
    adapter's manifest names holds another SAE now) on each genre's `split` band; merged into `out_file` under
    (model, setting), with the caller's `extra` fields."""
    import torch

    from saelora.adapters.bundle import read_manifest
    from saelora.adapters.config import demo_dir
    from saelora.trainer.run_eval import EvalConfig, run_eval

    torch.set_num_threads(2)
    adapter = adapter or demo_dir(model) / "adapter"
    trained = read_manifest(adapter).training.get("corpus", {}).get("config", {})
    setting = setting or f"SAE and adapter trained on {'+'.join(trained.get('sources', ['wiki']))}"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:  # each genre's own band: the first as the main corpus
        res = run_eval(EvalConfig(model=model, adapter=str(adapter), saes=[str(sae)] if sae else [],
                                  corpus=[genres[0]], held_out=list(genres[1:]), split=split, rows=rows,
                                  out=str(Path(tmp) / "eval.json")))
    per_corpus = {}
    for name, r in res.items():
        genre = genres[0] if name.startswith("held-out") else name.split(" ")[0]
        (sae,) = r["saes"].values()
        per_corpus[genre] = {"tokens": r["tokens"], "ce_base": r["ce_base"], "ce_spliced": r["ce_spliced"],
                             "ce_adapted": r["ce_adapted"], "ce_cost": r["ce_spliced"] - r["ce_base"],
                             "ce_cost_ci": r.get("ce_cost_ci"), "gap_closed": r["gap_closed"],
                             "gap_closed_ci": r.get("gap_closed_ci"), "fvu": sae.get("fvu_spliced"),
                             "drift_ce": r["ce_adapter_only"] - r["ce_base"], "kl_adapter_only": r["kl_adapter_only"]}
    out = {"model": model, "setting": setting, "adapter": str(adapter), "trained_corpus": trained, "rows": rows,
           "split": split, "seconds": round(time.perf_counter() - t0, 1), "corpora": per_corpus, **(extra or {})}
    results = json.loads(out_file.read_text()) if out_file.is_file() else []
    results = [r for r in results if (r["model"], r["setting"]) != (model, setting)] + [out]
    out_file.write_text(json.dumps(results, indent=1))
    log.info("%s", json.dumps(out, indent=1))
    return out


def _ci(c: dict, key: str, scale: float = 1.0, fmt: str = ".1f") -> str:
    ci = c.get(f"{key}_ci")
    return f" [{scale * ci[0]:{fmt}}, {scale * ci[1]:{fmt}}]" if ci else ""


def report() -> None:
    results = json.loads(OUT.read_text())
    lines = ["# Generalisation beyond the training text", "",
             "Written by `bench/generalisation.py --report` (and `bench/leave_one_out.py`). An SAE and a LoRA adapter "
             "on the held-out band of each genre (adapters/genres.py; the hash bands the adapter was trained with; "
             "`val` or `test` as given), replace mode. CE in nats per token; CE cost = spliced - base; gap closed = "
             "(spliced - adapted) / (spliced - base), with a 95% bootstrap interval over rows (one adapter, one seed: "
             "the interval is over text, not over training runs); drift = the adapter alone, SAE off, minus base.", ""]
    for r in results:
        lines += [f"## {r['model']}: {r['setting']} ({r['rows']} rows per corpus, {r.get('split', 'val')} band, "
                  f"{r['seconds']:.0f} s)", "",
                  "| genre | tokens | FVU | CE base | CE spliced | CE cost | CE adapted | gap closed | drift CE |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for g, c in r["corpora"].items():
            drift = f"{c['drift_ce']:+.3f}" if "drift_ce" in c else ""
            lines.append(f"| {g} | {c['tokens']} | {c['fvu']:.3f} | {c['ce_base']:.3f} | {c['ce_spliced']:.3f} | "
                         f"{c['ce_cost']:.3f}{_ci(c, 'ce_cost', fmt='.3f')} | {c['ce_adapted']:.3f} | "
                         f"{100 * c['gap_closed']:.1f}%{_ci(c, 'gap_closed', 100)} | {drift} |")
        lines.append("")
    (RESULTS / "generalisation.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", type=int, default=128, help="rows per corpus (the adapter's row length)")
    p.add_argument("--setting", help="name of this row set (default: from the adapter's training corpus)")
    p.add_argument("--adapter", type=Path, help="adapter bundle (default: the model's demo adapter)")
    p.add_argument("--sae", type=Path, help="SAE folder (default: the one the adapter's manifest names)")
    p.add_argument("--split", choices=("val", "test"), default="val", help="each genre's band evaluated")
    p.add_argument("--genres", nargs="+", default=list(GENRES), choices=GENRES, help="genres evaluated")
    p.add_argument("--report", action="store_true")
    args = p.parse_args(argv)
    if not args.report:
        run(args.model, args.rows, args.setting, args.adapter, args.split, tuple(args.genres), sae=args.sae)
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
