"""The training loop shared by `saelora train` (LoRA around frozen SAEs) and `saelora train-e2e` (the SAE
itself, model frozen): same data, same objective, same budget accounting, same eval.

Read top to bottom: batches -> objective -> backward -> clip -> step -> log / eval / checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from saelora.adapters.hooks import HookPoint
from saelora.adapters.saes import LoadedSAE

from .config import TrainConfig
from .evaluate import evaluate
from .objective import ObjectiveWeights, objective

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint/state.pt"


@dataclass
class Trainee:
    """What is being trained: the model (PeftModel for LoRA), the spliced SAEs, and the trainable tensors."""

    model: torch.nn.Module
    saes: Sequence[LoadedSAE]
    named_params: list[tuple[str, torch.nn.Parameter]]
    point: HookPoint | None  # shared prefix of teacher and student (None: run full forwards)
    has_adapter: bool  # evaluate the adapter variants


@dataclass
class LoopState:
    step: int = 0
    tokens: int = 0
    train_s: float = 0.0  # training wall time (eval and checkpoint time excluded)
    evals: list[dict[str, Any]] = field(default_factory=list)


def training_mode(tr: Trainee) -> None:
    """Train mode for what is trained, eval mode for what is frozen: the base model (teacher and student alike)
    runs without dropout, so the teacher's logits are a fixed target; LoRA dropout and trained SAEs train."""
    tr.model.eval()
    for name, module in tr.model.named_modules():
        if "lora_dropout" in name.split("."):
            module.train()
    for s in tr.saes:
        if any(p.requires_grad for p in s.sae.parameters()):
            s.sae.train()


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    total = cfg.total_steps()

    def f(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.schedule == "constant" or not total:
            return warm
        frac = min(1.0, step / max(1, total))
        decay = 0.5 * (1 + math.cos(math.pi * frac)) if cfg.schedule == "cosine" else 1.0 - frac
        return warm * decay
    return f


def batch_rows(train: torch.Tensor, order: torch.Tensor, micro: int, batch_size: int) -> torch.Tensor:
    """Rows for global micro-batch `micro`: a fixed seeded order, wrapped around (deterministic, resumable)."""
    idx = (torch.arange(batch_size) + micro * batch_size) % len(order)
    return train[order[idx]]  # (B, T)


def _append(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _save_checkpoint(out: Path, tr: Trainee, opt: torch.optim.Optimizer, sched: Any, st: LoopState) -> None:
    path = out / CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"params": {n: p.detach().clone() for n, p in tr.named_params}, "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
            "state": {"step": st.step, "tokens": st.tokens, "train_s": st.train_s, "evals": json.dumps(st.evals)}}
    torch.save(blob, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def _load_checkpoint(out: Path, tr: Trainee, opt: torch.optim.Optimizer, sched: Any) -> LoopState:
    blob = torch.load(out / CHECKPOINT, weights_only=True)  # tensors and plain containers only
    params = dict(tr.named_params)
    with torch.no_grad():
        for n, t in blob["params"].items():
            params[n].copy_(t)
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["rng"])
    s = blob["state"]
    st = LoopState(step=int(s["step"]), tokens=int(s["tokens"]), train_s=float(s["train_s"]),
                   evals=json.loads(s["evals"]))
    metrics = out / "metrics.jsonl"
    if metrics.is_file():  # drop rows logged after the checkpoint
        keep = [ln for ln in metrics.read_text().splitlines() if json.loads(ln).get("step", 0) <= st.step]
        metrics.write_text("".join(k + "\n" for k in keep))
    log.info("resumed from %s at step %d", out / CHECKPOINT, st.step)
    return st


def _eval(tr: Trainee, val: torch.Tensor, cfg: TrainConfig, st: LoopState, metrics: Path) -> dict[str, Any]:
    tr.model.eval()
    for s in tr.saes:
        s.sae.eval()
    res = evaluate(tr.model, tr.saes, val, batch_size=cfg.batch_size, adapter=tr.has_adapter,
                   point=tr.point).to_json()
    training_mode(tr)
    res.update(step=st.step, tokens_seen=st.tokens, train_s=round(st.train_s, 2))  # res["tokens"]: eval tokens
    st.evals.append(res)
    _append(metrics, {"step": st.step, "eval": res})
    log.info("eval step %d: ce base %.4f spliced %.4f adapted %s kl %s", st.step, res["ce_base"], res["ce_spliced"],
             f"{res.get('ce_adapted', float('nan')):.4f}", f"{res.get('kl_adapted', res['kl_spliced']):.4f}")
    return res


def _done(cfg: TrainConfig, st: LoopState, total: int | None) -> bool:
    return (total is not None and st.step >= total) or \
        (cfg.max_minutes is not None and st.train_s >= 60 * cfg.max_minutes)


def _eval_due(cfg: TrainConfig, st: LoopState, last_eval_s: float) -> bool:
    by_step = cfg.eval_interval and st.step % cfg.eval_interval == 0
    by_time = cfg.eval_every_s is not None and st.train_s - last_eval_s >= cfg.eval_every_s
    return bool(by_step or by_time)


def train_loop(tr: Trainee, train: torch.Tensor, val: torch.Tensor, cfg: TrainConfig, out: Path) -> LoopState:
    """Optimise `tr.named_params` on `train` rows until the budget is spent; returns the final state."""
    params = [p for _, p in tr.named_params]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    weights = ObjectiveWeights(cfg.kl_reduction, cfg.ce_weight, cfg.mse_weight)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))
    metrics, total = out / "metrics.jsonl", cfg.total_steps()
    if cfg.resume and (out / CHECKPOINT).is_file():
        st = _load_checkpoint(out, tr, opt, sched)
    else:
        metrics.unlink(missing_ok=True)
        st = LoopState()
        _eval(tr, val, cfg, st, metrics)
    last_eval_s = st.evals[-1]["train_s"] if st.evals else 0.0
    training_mode(tr)
    bar = tqdm(total=total, initial=st.step, desc="train", unit="step", disable=None)
    try:
        while not _done(cfg, st, total):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            parts: dict[str, float] = {}
            for m in range(cfg.grad_accum):
                ids = batch_rows(train, order, st.step * cfg.grad_accum + m, cfg.batch_size)  # (B, T)
                loss, p = objective(tr.model, tr.saes, ids, weights, tr.point)
                (loss / cfg.grad_accum).backward()
                parts = {k: parts.get(k, 0.0) + v / cfg.grad_accum for k, v in p.items()}
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            sched.step()
            st.step += 1
            st.tokens += cfg.batch_size * cfg.grad_accum * cfg.seq_len
            st.train_s += time.perf_counter() - t0
            _append(metrics, {"step": st.step, "tokens": st.tokens, "train_s": round(st.train_s, 3),
                              "lr": sched.get_last_lr()[0], "grad_norm": float(grad_norm), **parts})
            bar.update(1)
            bar.set_postfix(kl=f"{parts['kl']:.4f}")
            if _eval_due(cfg, st, last_eval_s):
                _eval(tr, val, cfg, st, metrics)
                last_eval_s = st.train_s
            if cfg.checkpoint_interval and st.step % cfg.checkpoint_interval == 0:
                _save_checkpoint(out, tr, opt, sched, st)
    except KeyboardInterrupt:
        _save_checkpoint(out, tr, opt, sched, st)
        log.warning("interrupted at step %d; checkpoint saved: rerun with --resume to continue", st.step)
        raise
    finally:
        bar.close()
    if not st.evals or st.evals[-1]["step"] != st.step:
        _eval(tr, val, cfg, st, metrics)
    _save_checkpoint(out, tr, opt, sched, st)
    return st
