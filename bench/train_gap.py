"""Benchmark: how much of the SAE's CE gap LoRA closes, and how fast, vs the e2e SAE baseline.

On the embedded model and corpus: train a TopK SAE at a middle layer; then, for the same training
wall-clock budget each, train (a) LoRA `all`, (b) LoRA `after`, (c) e2e SAE fine-tuning, with held-out
evals every few minutes. Also measures the step cost of LoRA-around-SAE vs a plain LoRA (CE) step,
interleaved. Writes bench/results/train_gap.{json,md,png}.

    python bench/train_gap.py                 # full (~60 min on 2 CPU cores)
    python bench/train_gap.py --quick         # smoke run, a few minutes
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from saelora.adapters.config import cache_dir
from saelora.trainer.config import TrainConfig
from saelora.trainer.e2e import train_e2e
from saelora.trainer.train import train_lora
from saelora.trainer.train_sae import SAETrainConfig, train_sae

log = logging.getLogger("bench.train_gap")
RESULTS = Path(__file__).parent / "results"


def get_sae(args: argparse.Namespace) -> Path:
    folder = cache_dir() / "bench" / f"sae-L{args.layer}-topk-{args.sae_tokens}"
    if (folder / "cfg.json").is_file() and not args.fresh_sae:
        log.info("reusing SAE %s", folder)
        return folder
    t0 = time.perf_counter()
    train_sae(SAETrainConfig(hook=f"blocks.{args.layer}.hook_resid_post", tokens=args.sae_tokens, d_sae=args.d_sae,
                             k=args.k, out=str(folder)))
    log.info("SAE trained in %.1f min", (time.perf_counter() - t0) / 60)
    return folder


def run_configs(args: argparse.Namespace, sae: Path, work: Path) -> dict[str, TrainConfig]:
    common = dict(saes=[str(sae)], max_minutes=args.run_minutes, eval_every_s=args.eval_every_s, eval_interval=0,
                  eval_rows=args.eval_rows, batch_size=args.batch_size, seq_len=args.seq_len, checkpoint_interval=0)
    return {
        "lora_all": TrainConfig(out=str(work / "lora_all"), layers="all", rank=args.rank, lr=args.lora_lr, **common),
        "lora_after": TrainConfig(out=str(work / "lora_after"), layers="after", rank=args.rank, lr=args.lora_lr,
                                  **common),
        "e2e": TrainConfig(out=str(work / "e2e"), lr=args.e2e_lr, **common),
    }


def curve(run_dir: Path, key: str) -> list[tuple[float, float]]:
    """(training minutes, held-out CE) at each eval."""
    evals = [json.loads(ln)["eval"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln]
    return [(e["train_s"] / 60, e[key]) for e in evals]


def time_to_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """First time the curve reaches `target` CE, linearly interpolated between evals."""
    for (t0, c0), (t1, c1) in zip(points, points[1:], strict=False):
        if c1 <= target:
            return t1 if c0 == c1 else t0 + (t1 - t0) * (c0 - target) / (c0 - c1)
    return 0.0 if points and points[0][1] <= target else None


def step_costs(args: argparse.Namespace, sae: Path, repeats: int = 3) -> dict[str, float]:
    """Median seconds per step: LoRA-around-SAE (all, after) vs a plain LoRA CE step, interleaved."""
    from saelora.adapters.models import load_model
    from saelora.adapters.saes import load_sae
    from saelora.trainer.lora import LoraSettings, add_lora
    from saelora.trainer.objective import ObjectiveWeights, objective
    from saelora.trainer.train import shared_prefix_point

    lm = load_model("smollm2-135m")
    lm.model.requires_grad_(False)
    s = load_sae(lm.model, str(sae))
    ids = torch.randint(0, 49152, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    model = add_lora(lm.model, LoraSettings(rank=args.rank), [s.hook])  # all layers
    after_point = shared_prefix_point(lm.model, [s], list(range(s.hook.depth, 30)))
    times: dict[str, list[float]] = {"plain_lora": [], "lora_sae_all": [], "lora_sae_after_prefix": []}

    def plain() -> None:
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()

    def around(point) -> None:
        loss, _ = objective(model, [s], ids, ObjectiveWeights(), point)
        loss.backward()
    steps = {"plain_lora": plain, "lora_sae_all": lambda: around(None),
             "lora_sae_after_prefix": lambda: around(after_point)}
    for fn in steps.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in steps.items():
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {**{f"{k}_s": round(v, 3) for k, v in med.items()},
            "ratio_all": round(med["lora_sae_all"] / med["plain_lora"], 3),
            "ratio_after_shared_prefix": round(med["lora_sae_after_prefix"] / med["plain_lora"], 3),
            "note": "lora_sae_after_prefix: LoRA on all layers but the layers before the SAE run once for teacher "
                    "and student (the saving `layers=after` gets); plain_lora: CE loss, no teacher, no SAE"}


def plot(curves: dict[str, list[tuple[float, float]]], base: float, spliced: float, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    ax.axhline(base, color="k", ls="--", label="base model")
    ax.axhline(spliced, color="r", ls=":", label="SAE spliced, no training")
    ax.set(xlabel="training wall time (min, 2 CPU cores)", ylabel="held-out CE (nats/token)",
           title="SmolLM2-135M + TopK SAE: CE vs training time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def summarise(args, work: Path, sae: Path, costs: dict) -> dict:
    keys = {"lora_all": "ce_adapted", "lora_after": "ce_adapted", "e2e": "ce_spliced"}
    curves = {name: curve(work / name, key) for name, key in keys.items()}
    first = json.loads((work / "lora_all" / "metrics.jsonl").read_text().splitlines()[0])["eval"]
    base, spliced = first["ce_base"], first["ce_spliced"]
    gap = {n: (spliced - c[-1][1]) / (spliced - base) for n, c in curves.items()}
    e2e_final, e2e_time = curves["e2e"][-1][1], curves["e2e"][-1][0]
    reach = {n: time_to_reach(curves[n], e2e_final) for n in ("lora_all", "lora_after")}
    speedup = {n: (round(e2e_time / t, 2) if t else None) for n, t in reach.items()}
    sae_cfg = json.loads((sae / "cfg.json").read_text())
    return {"settings": vars(args), "sae": {"folder": str(sae), "hook": sae_cfg["metadata"]["hook_name"],
            "d_sae": sae_cfg["d_sae"], "k": sae_cfg.get("k"),
            **{k: sae_cfg["metadata"].get(k) for k in ("fvu", "l0", "dead_latents", "train_seconds")}},
            "ce_base": base, "ce_spliced": spliced, "curves": curves,
            "gap_closed": {n: round(g, 4) for n, g in gap.items()},
            "final_ce": {n: c[-1][1] for n, c in curves.items()},
            "e2e_final_ce": e2e_final, "minutes_to_reach_e2e_final_ce": reach,
            "speedup_vs_e2e": speedup, "step_cost": costs,
            "targets": {"gap_closed_min": 0.30, "gap_closed_aim": 0.55, "speedup_min": 2, "speedup_aim": 5,
                        "step_cost_ratio_max": 1.3}}


def write_md(res: dict, path: Path) -> None:
    lines = ["# train_gap: LoRA around a frozen SAE vs e2e SAE fine-tuning", "",
             f"SAE: TopK at `{res['sae']['hook']}`, d_sae {res['sae']['d_sae']}, held-out FVU "
             f"{res['sae']['fvu']:.3f}, L0 {res['sae']['l0']:.1f}; budget {res['settings']['run_minutes']} min of "
             "training each on 2 CPU cores.", "",
             f"CE base {res['ce_base']:.4f}, spliced {res['ce_spliced']:.4f} (gap "
             f"{res['ce_spliced'] - res['ce_base']:.4f})", "",
             "| run | final CE | gap closed | min to reach e2e final CE | speed-up vs e2e |", "|---|---|---|---|---|"]
    for n in ("lora_all", "lora_after", "e2e"):
        reach = res["minutes_to_reach_e2e_final_ce"].get(n)
        lines.append(f"| {n} | {res['final_ce'][n]:.4f} | {res['gap_closed'][n]:.1%} | "
                     f"{'' if reach is None else f'{reach:.1f}'} | {res['speedup_vs_e2e'].get(n) or ''} |")
    c = res["step_cost"]
    lines += ["", f"Step cost (median s/step): plain LoRA {c['plain_lora_s']}, LoRA+SAE all {c['lora_sae_all_s']} "
              f"(ratio {c['ratio_all']}), with the shared prefix {c['lora_sae_after_prefix_s']} "
              f"(ratio {c['ratio_after_shared_prefix']}).", "", "![curves](train_gap.png)"]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny budgets: checks the pipeline, numbers meaningless")
    p.add_argument("--layer", type=int, default=12, help="SAE at blocks.LAYER.hook_resid_post")
    p.add_argument("--sae-tokens", type=int, default=500_000, help="SAE training activations")
    p.add_argument("--d-sae", type=int, default=4608, help="SAE latents")
    p.add_argument("--k", type=int, default=32, help="TopK k")
    p.add_argument("--run-minutes", type=float, default=12.0, help="training wall-clock budget per run")
    p.add_argument("--eval-every-s", type=float, default=150.0, help="seconds of training between evals")
    p.add_argument("--eval-rows", type=int, default=8, help="held-out rows of seq-len tokens per eval")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank")
    p.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA learning rate (constant)")
    p.add_argument("--e2e-lr", type=float, default=3e-4, help="e2e SAE learning rate (constant)")
    p.add_argument("--batch-size", type=int, default=4, help="rows per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    p.add_argument("--fresh-sae", action="store_true", help="retrain the SAE even if cached")
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    args = p.parse_args()
    if args.quick:
        args.sae_tokens, args.d_sae, args.run_minutes, args.eval_every_s, args.eval_rows = 20_000, 1152, 0.4, 10, 2
        args.seq_len = 64
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(torch.get_num_threads())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = cache_dir() / "bench" / ("train_gap_quick" if args.quick else "train_gap")
    sae = get_sae(args)
    costs = step_costs(args, sae, repeats=1 if args.quick else 3)
    log.info("step costs: %s", costs)
    for name, cfg in run_configs(args, sae, work).items():
        log.info("run %s for %.1f min", name, args.run_minutes)
        (train_e2e if name == "e2e" else train_lora)(cfg)
    res = summarise(args, work, sae, costs)
    stem = "train_gap_quick" if args.quick else "train_gap"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2))
    write_md(res, out / f"{stem}.md")
    plot(res["curves"], res["ce_base"], res["ce_spliced"], out / f"{stem}.png")
    print((out / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
