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
from .distributed import DataParallel
from .evaluate import evaluate
from .objective import ObjectiveWeights, objective
from .tracking import Tracker, make_tracker

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


def lr_lambda(cfg: TrainConfig, processes: int = 1) -> Callable[[int], float]:
    total = cfg.total_steps(processes)

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


class _Metrics:
    """metrics.jsonl (rank 0), and the same rows to the experiment tracker (`--report-to`)."""

    def __init__(self, path: Path, tracker: Tracker) -> None:
        self.path, self.tracker = path, tracker

    def append(self, row: dict[str, Any]) -> None:
        _append(self.path, row)
        self.tracker.log(row)


def _save_checkpoint(out: Path, tr: Trainee, opt: torch.optim.Optimizer, sched: Any, st: LoopState,
                     dp: DataParallel, interrupted: bool = False) -> None:
    """Rank 0 writes (the weights and optimizer state are the same on every rank); every rank's RNG is kept,
    except after an interrupt, where no collective can be trusted: then every rank resumes with rank 0's."""
    rng = torch.get_rng_state()
    rngs = [rng] * dp.world if interrupted else dp.gather_bytes(rng)  # a collective: every rank takes part
    if not dp.is_main:
        return
    path = out / CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"params": {n: p.detach().clone() for n, p in tr.named_params}, "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "rng": rngs[0] if dp.world == 1 else rngs,
            "state": {"step": st.step, "tokens": st.tokens, "train_s": st.train_s, "evals": json.dumps(st.evals),
                      "world": dp.world}}
    torch.save(blob, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def _load_checkpoint(out: Path, tr: Trainee, opt: torch.optim.Optimizer, sched: Any, dp: DataParallel) -> LoopState:
    blob = torch.load(out / CHECKPOINT, weights_only=True)  # tensors and plain containers only
    params = dict(tr.named_params)
    with torch.no_grad():
        for n, t in blob["params"].items():
            params[n].copy_(t)
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    rng, s = blob["rng"], blob["state"]
    if int(s.get("world", 1)) != dp.world:
        log.warning("checkpoint written by %s process(es), resumed with %d: the data order and the global batch "
                    "follow --batch-size x processes from here on", s.get("world", 1), dp.world)
    # a fresh copy: set_rng_state reads a tensor's storage from its start (a row view of a stacked gather
    # crashed it with SIGSEGV)
    torch.set_rng_state((rng[dp.rank % len(rng)] if isinstance(rng, list) else rng).clone())
    st = LoopState(step=int(s["step"]), tokens=int(s["tokens"]), train_s=float(s["train_s"]),
                   evals=json.loads(s["evals"]))
    metrics = out / "metrics.jsonl"
    if dp.is_main and metrics.is_file():  # drop rows logged after the checkpoint
        keep = [ln for ln in metrics.read_text().splitlines() if json.loads(ln).get("step", 0) <= st.step]
        metrics.write_text("".join(k + "\n" for k in keep))
    log.info("resumed from %s at step %d", out / CHECKPOINT, st.step)
    return st


def _eval(tr: Trainee, val: torch.Tensor, cfg: TrainConfig, st: LoopState, metrics: _Metrics,
          dp: DataParallel) -> dict[str, Any]:
    """Evaluate on every rank's share of `val`, the sums reduced: the same result as one process on all of it."""
    tr.model.eval()
    for s in tr.saes:
        s.sae.eval()
    res = evaluate(tr.model, tr.saes, dp.eval_rows(val, cfg.batch_size), batch_size=cfg.batch_size,
                   adapter=tr.has_adapter, point=tr.point, sum_across=dp.sum).to_json()
    training_mode(tr)
    res.update(step=st.step, tokens_seen=st.tokens, train_s=round(st.train_s, 2))  # res["tokens"]: eval tokens
    st.evals.append(res)
    if dp.is_main:
        metrics.append({"step": st.step, "eval": res})
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


def _step(tr: Trainee, train: torch.Tensor, order: torch.Tensor, cfg: TrainConfig, st: LoopState,
          opt: torch.optim.Optimizer, weights: ObjectiveWeights, dp: DataParallel) -> tuple[dict[str, float], float]:
    """One optimizer step on this rank's rows of the global batch; gradients and logged parts are averaged over
    ranks. Returns (parts, grad norm)."""
    params = [p for _, p in tr.named_params]
    opt.zero_grad(set_to_none=True)
    parts: dict[str, float] = {}
    for m in range(cfg.grad_accum):
        rows = batch_rows(train, order, st.step * cfg.grad_accum + m, cfg.batch_size * dp.world)
        loss, p = objective(tr.model, tr.saes, dp.shard(rows), weights, tr.point)  # (B, T) per rank
        (loss / cfg.grad_accum).backward()
        parts = {k: parts.get(k, 0.0) + v / cfg.grad_accum for k, v in p.items()}
    dp.average_gradients(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
    opt.step()
    if dp.world > 1:
        mean = dp.mean(torch.tensor(list(parts.values()), dtype=torch.float64)).tolist()
        parts = dict(zip(parts, mean, strict=True))
    return parts, float(grad_norm)


def train_loop(tr: Trainee, train: torch.Tensor, val: torch.Tensor, cfg: TrainConfig, out: Path,
               dp: DataParallel = DataParallel()) -> LoopState:
    """Optimise `tr.named_params` on `train` rows until the budget is spent; returns the final state.
    With `dp` of several processes, each trains on its block of the global batch (trainer/distributed.py)."""
    params = [p for _, p in tr.named_params]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, dp.world))
    weights = ObjectiveWeights(cfg.kl_reduction, cfg.ce_weight, cfg.mse_weight)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))
    total = cfg.total_steps(dp.world)
    metrics = _Metrics(out / "metrics.jsonl", make_tracker(cfg.report_to, out, cfg.to_json(), dp.is_main))
    if dp.world > 1:
        torch.manual_seed(cfg.seed + dp.rank)  # weights were initialised alike; dropout masks now differ per rank
    if cfg.resume and (out / CHECKPOINT).is_file():
        st = _load_checkpoint(out, tr, opt, sched, dp)
    else:
        if dp.is_main:
            metrics.path.unlink(missing_ok=True)
        st = LoopState()
        _eval(tr, val, cfg, st, metrics, dp)
    last_eval_s = st.evals[-1]["train_s"] if st.evals else 0.0
    training_mode(tr)
    bar = tqdm(total=total, initial=st.step, desc="train", unit="step", disable=None if dp.is_main else True)
    try:
        while not _done(cfg, st, total):
            t0 = time.perf_counter()
            parts, grad_norm = _step(tr, train, order, cfg, st, opt, weights, dp)
            sched.step()
            st.step += 1
            st.tokens += cfg.batch_size * dp.world * cfg.grad_accum * cfg.seq_len
            dt = time.perf_counter() - t0
            st.train_s += dt if dp.world == 1 else float(dp.mean(torch.tensor([dt], dtype=torch.float64)))
            if dp.is_main:
                metrics.append({"step": st.step, "tokens": st.tokens, "train_s": round(st.train_s, 3),
                                "lr": sched.get_last_lr()[0], "grad_norm": grad_norm, **parts})
            bar.update(1)
            bar.set_postfix(kl=f"{parts['kl']:.4f}")
            if _eval_due(cfg, st, last_eval_s):
                _eval(tr, val, cfg, st, metrics, dp)
                last_eval_s = st.train_s
            if cfg.checkpoint_interval and st.step % cfg.checkpoint_interval == 0:
                _save_checkpoint(out, tr, opt, sched, st, dp)
        if not st.evals or st.evals[-1]["step"] != st.step:  # the final eval, also logged to the tracker
            _eval(tr, val, cfg, st, metrics, dp)
    except KeyboardInterrupt:
        _save_checkpoint(out, tr, opt, sched, st, dp, interrupted=True)
        log.warning("interrupted at step %d; checkpoint saved: rerun with --resume to continue", st.step)
        raise
    finally:
        bar.close()
        metrics.tracker.close()
    _save_checkpoint(out, tr, opt, sched, st, dp)
    return st
