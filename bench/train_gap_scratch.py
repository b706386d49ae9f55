"""The train_gap study's from-scratch comparison, the paper's time comparison (v2 protocol):

- a TopK SAE from scratch (MSE), one pass over --scratch-sae-tokens activations, written at several fractions of
  its training (--scratch-fractions); each checkpoint followed by LoRA on the layers after it. Its time is the
  share of activation collection that fraction needs plus its fitting time, then LoRA's training time;
- e2e SAEs from scratch (KL; Braun 2024) at several step budgets (--e2e-budgets), each with its learning rate
  swept (--e2e-lrs, extended beyond an edge while the best sits there, --max-extend) and chosen on the study's
  validation rows, like every arm; their time includes the initialisation's;
- every run evaluated at step 0 and every 10% of its steps on --scratch-eval-rows validation rows;
- per method, the envelope: the first time any of its runs reaches a CE. The speed-up is read at the final
  validation CE of each e2e budget (>= 3 levels): e2e's time / TopK + LoRA's time, with tokens and steps.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Callable

from train_gap_grid import bracketed_sweep

log = logging.getLogger("bench.train_gap")
Point = tuple[float, int, int, float]  # seconds (total), training tokens, steps, validation CE


def _sae_config(args: argparse.Namespace, out: Path, tokens: int, epochs: int, checkpoints: list[float]) -> Any:
    from saelora.trainer.train_sae import SAETrainConfig

    sae_cfg = json.loads((Path(args.sae) / "cfg.json").read_text())
    return SAETrainConfig(model=args.model, hook=sae_cfg["metadata"]["hook_name"], d_sae=sae_cfg["d_sae"],
                          k=sae_cfg.get("k", 32), corpus=list(args.corpus), tokens=tokens, epochs=epochs,
                          val_tokens=args.scratch_val_tokens, seq_len=args.sae_seq_len, out=str(out), seed=0,
                          cache_activations=False, checkpoints=checkpoints, ce_rows=0)


def _train_once(cfg: Any) -> tuple[Path, dict[str, Any]]:
    """train_sae(cfg), or the finished SAE in cfg.out trained with exactly this config (its recorded timings kept:
    a rerun of the study adds runs without re-measuring the ones it reuses)."""
    from dataclasses import asdict

    from saelora.trainer.train_sae import train_sae

    record = Path(cfg.out) / "train_sae.json"
    if record.is_file():
        done = json.loads(record.read_text())
        if done["config"] == json.loads(json.dumps(asdict(cfg), default=str)):
            log.info("reusing the finished SAE in %s", cfg.out)
            return Path(cfg.out), done["quality"]
    return train_sae(cfg)


def topk_checkpoints(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """The TopK SAE and its checkpoints: [{fraction, folder, seconds, tokens, steps}], seconds as if training
    had stopped there (that share of the activations collected, and the fitting so far)."""
    fractions = sorted(set(args.scratch_fractions) | {1.0})
    cfg = _sae_config(args, work / "scratch_topk", args.scratch_sae_tokens, 1, fractions[:-1])
    folder, q = _train_once(cfg)
    out = []
    for f in fractions:
        path = folder if f == 1.0 else folder / "checkpoints" / f"{f:g}"
        meta = json.loads((path / "cfg.json").read_text())["metadata"]
        fit_s = q["fit_seconds"] if f == 1.0 else meta["fit_seconds"]
        samples = q["train_activations"] if f == 1.0 else meta["samples"]
        out.append({"fraction": f, "folder": str(path), "seconds": f * q["collect_seconds"] + fit_s,
                    "tokens": samples, "steps": samples // cfg.batch_tokens})
    return out


def e2e_init(args: argparse.Namespace, work: Path) -> tuple[str, float]:
    """The e2e SAE's start: initialised from activation statistics, no training step (its time counts: train_sae's
    own, activation collection included)."""
    folder, q = _train_once(_sae_config(args, work / "scratch_init", args.scratch_val_tokens, 0, []))
    return str(folder), q["train_seconds"]


def _curve(rec: dict[str, Any], offset_s: float, offset_tokens: int, offset_steps: int) -> list[Point]:
    per_step = rec["tokens"] // rec["steps"]
    return [(offset_s + t, offset_tokens + s * per_step, offset_steps + s, ce) for t, s, ce in rec["train_curve"]]


def time_to_reach(curve: list[Point], target: float) -> Point | None:
    """The first point where a curve reaches `target` CE, linearly interpolated between evals."""
    if curve and curve[0][3] <= target:
        return curve[0]
    for a, b in zip(curve, curve[1:], strict=False):
        if b[3] <= target:
            w = 1.0 if a[3] == b[3] else (a[3] - target) / (a[3] - b[3])
            return (a[0] + w * (b[0] - a[0]), round(a[1] + w * (b[1] - a[1])), round(a[2] + w * (b[2] - a[2])),
                    target)
    return None


def envelope(curves: list[list[Point]], target: float) -> Point | None:
    """The earliest any curve reaches `target`."""
    hits = [p for p in (time_to_reach(c, target) for c in curves) if p is not None]
    return min(hits, default=None)


def speedups(e2e: list[list[Point]], topk: list[list[Point]], levels: list[float]) -> list[dict[str, Any]]:
    out = []
    for c in sorted(levels, reverse=True):
        a, b = envelope(e2e, c), envelope(topk, c)
        out.append({"target_ce": c, "e2e": a, "topk_lora": b,
                    "speedup": None if a is None or b is None else round(a[0] / b[0], 2)})
    return out


def from_scratch(args: argparse.Namespace, work: Path, run: Callable[..., dict[str, Any]], lora_lr: float,
                 test_ce: Callable[..., float]) -> dict[str, Any]:
    """`run(arm, lr, seed, work, sae, steps=)` trains one run (evaluated every 10%); `test_ce(sae, adapter=None)`
    is a test-band CE, read after every choice below is made."""
    scratch = work / "scratch"
    topk = []
    for ck in topk_checkpoints(args, work):
        rec = run("scratch_lora", lora_lr, 0, scratch / f"topk{ck['fraction']:g}", ck["folder"])
        topk.append({**ck, "lora": rec, "curve": _curve(rec, ck["seconds"], ck["tokens"], ck["steps"])})
    init, init_s = e2e_init(args, work)
    e2e = []
    for budget in args.e2e_budgets:
        runs, best, edge = bracketed_sweep(f"e2e {budget} steps", args.e2e_lrs,
                                           lambda lr, b=budget: run("e2e_scratch", lr, 0, scratch, init, steps=b),
                                           lambda r: r["val_ce"], args.max_extend)
        e2e.append({"steps": budget, "lr": best["lr"], "at_edge": edge, "runs": runs, "artifact": best["artifact"],
                    "curve": _curve(best, init_s, 0, 0)})
    levels = [b["curve"][-1][3] for b in e2e]
    res = {"protocol": "v2", "init_seconds": round(init_s, 1), "lora_lr": lora_lr, "topk": topk, "e2e": e2e,
           "speedups": speedups([b["curve"] for b in e2e], [t["curve"] for t in topk], levels)}
    for t in topk:
        t["test_ce"] = {"spliced": test_ce(t["folder"]), "lora": test_ce(t["folder"], t["lora"]["artifact"])}
    for b in e2e:
        b["test_ce"] = test_ce(b["artifact"])
    return res
