"""`saelora train-sae`: train an SAE with sae-lens's trainer on cached activations of a model at a hook.

Read top to bottom:
1. the corpus is packed with a held-out band (`holdout_fraction` of documents, by hash: it contains the
   validation and test bands of every `train`/`eval` run with smaller fractions, so the SAE never sees them);
2. activations at the hook are collected once at the positions the SAE's policy splices (position 0 of a
   model without BOS and BOS/EOS tokens are dropped) and cached on disk as fp16;
3. sae-lens's trainer runs `epochs` passes over them in a fresh shuffled order each: activation norm
   scaling (`expected_average_only_in`, folded into the weights when saving), encoder initialised from the
   decoder, b_dec initialised at the activation mean, AuxK loss on latents dead for `dead_window` steps;
   every `log_every` steps its step scalars go to out/metrics.jsonl (and to the `report_to` tracker);
4. held-out FVU / L0 / dead latents are measured on >= `val_tokens` activations of held-out documents, and
   written with the policy and the resolved config into the sae-lens cfg metadata.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from saelora.adapters.activations import run_to_hook
from saelora.adapters.config import DEFAULT_CORPUS, DEFAULT_MODEL, cache_dir
from saelora.adapters.corpus import CorpusConfig, load_corpus
from saelora.adapters.errors import ConfigError
from saelora.adapters.hooks import resolve_hook
from saelora.adapters.models import load_model
from saelora.adapters.policy import POLICY_KEY, PositionPolicy, apply_override, default_policy

from .config import opt
from .tracking import ReportTo, Tracker, is_number, make_tracker
from .tracking import check as check_report_to

log = logging.getLogger(__name__)
ARCHITECTURES = ("topk", "relu", "jumprelu", "batchtopk")


@dataclass
class SAETrainConfig:
    model: str = opt(DEFAULT_MODEL, "base model spec")
    hook: str | None = opt(None, "where the SAE reads (TransformerLens name or HF module path); default: the residual "
                                 "stream after the layer at 40% of the depth (SmolLM2: 12, Gemma 3 270M: 7)")
    architecture: str = opt("topk", "topk | relu | jumprelu | batchtopk")
    d_sae: int | None = opt(None, "number of latents (default: 4 x d_model; SmolLM2: 2304, Gemma 3 270M: 2560)")
    k: int = opt(32, "active latents per token (topk, batchtopk)")
    sparsity_coefficient: float = opt(5.0, "L1 (relu) or L0 (jumprelu) coefficient")
    lr: float = opt(5e-4, "Adam learning rate (sae-lens trainer); decays linearly to lr/10 over the last 20%")
    tokens: int = opt(400_000, "distinct training activations collected (capped by the corpus)")
    epochs: int = opt(2, "passes over the collected activations, reshuffled each time (0: initialise only, from the "
                         "activation statistics, with no training step: the start of an e2e-from-scratch SAE)")
    batch_tokens: int = opt(1024, "activations per SAE step")
    seq_len: int = opt(128, "context size of the model forwards")
    model_batch: int = opt(16, "rows per model forward")
    aux_coefficient: float = opt(1.0 / 32, "AuxK loss weight (topk): reconstruct the residual with dead latents")
    dead_window: int = opt(100, "steps without firing after which a latent is dead for AuxK")
    sink_ratio: float | None = opt(5.0, "positions with residual norm > ratio x the median norm stay original (massive"
                                        " activations, attention sinks past position 0); recorded in the policy")
    policy: str | None = opt(None, "position-policy override, e.g. keep_first=0 (default: the paper's, per tokenizer)")
    corpus: list[str] = opt(factory=lambda: [DEFAULT_CORPUS], help="corpus sources for activations")
    holdout_fraction: float = opt(0.12, "documents never trained on (contains train/eval's val and test bands)")
    val_tokens: int = opt(100_000, "held-out activations for FVU / L0 / dead latents (capped by the held-out band)")
    out: str = opt("runs/sae", "the sae-lens folder written")
    seed: int = opt(0, "seeds the SAE init and the activation order")
    cache_activations: bool = opt(True, "reuse (and write) the on-disk activation cache; off: always collect, so the "
                                        "training time includes the model forwards")
    ce_rows: int = opt(32, "held-out rows over which the CE cost of splicing the trained SAE is measured (0: skip)")
    checkpoints: list[float] = opt(factory=list, help="fractions of training (0-1) at which the inference SAE is also "
                                   "written to out/checkpoints/<fraction>, with its fit time: a curve of SAEs")
    log_every: int = opt(50, "steps between rows of out/metrics.jsonl (sae-lens's step scalars: losses, L0, "
                             "explained variance, dead latents, lr)")
    report_to: ReportTo = opt("none", "experiment tracking, as the HF Trainer's option: tensorboard writes "
                              "out/tensorboard, trackio out/trackio; the scalars are metrics.jsonl's")
    device: str | None = opt(None, "default: cuda if available, else cpu")


def resolved(cfg: SAETrainConfig, model: torch.nn.Module) -> SAETrainConfig:
    """`cfg` with its model-dependent defaults (hook, d_sae) filled in for `model`."""
    from saelora.adapters.hooks import decoder_layers, hidden_size

    hook = cfg.hook or f"blocks.{round(0.4 * len(decoder_layers(model)))}.hook_resid_post"
    return replace(cfg, hook=hook, d_sae=cfg.d_sae or 4 * hidden_size(model))


def training_sae(arch: str, d_in: int, cfg: SAETrainConfig, metadata: dict[str, Any]) -> Any:
    """A fresh sae-lens training SAE of `arch` (fp32, activation norm scaling, encoder = decoder transpose)."""
    import sae_lens as sl
    from sae_lens.saes.sae import SAEMetadata

    common = dict(d_in=d_in, d_sae=cfg.d_sae, metadata=SAEMetadata(**metadata), device=cfg.device or "cpu",
                  normalize_activations="expected_average_only_in")
    if arch == "topk":
        return sl.TopKTrainingSAE(sl.TopKTrainingSAEConfig(k=cfg.k, aux_loss_coefficient=cfg.aux_coefficient,
                                                           **common))
    if arch == "batchtopk":
        return sl.BatchTopKTrainingSAE(sl.BatchTopKTrainingSAEConfig(k=cfg.k, aux_loss_coefficient=cfg.aux_coefficient,
                                                                     **common))
    if arch == "relu":
        return sl.StandardTrainingSAE(sl.StandardTrainingSAEConfig(l1_coefficient=cfg.sparsity_coefficient, **common))
    if arch == "jumprelu":
        return sl.JumpReLUTrainingSAE(sl.JumpReLUTrainingSAEConfig(l0_coefficient=cfg.sparsity_coefficient, **common))
    raise ConfigError(f"architecture must be one of {ARCHITECTURES}, got {arch!r}")


class StepRecorder:
    """Every `every` steps, sae-lens's own step scalars (its wandb dict, keys without their prefix) appended to
    `out`/metrics.jsonl and handed to the tracker: the same numbers in both. At the steps of `checkpoints`
    ({step: fraction}), the inference SAE so far is written to out/checkpoints/<fraction> with `metadata`."""

    def __init__(self, out: Path, every: int, tracker: Tracker, checkpoints: dict[int, float] | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        self.out, self.path, self.every, self.tracker = out, out / "metrics.jsonl", every, tracker
        self.checkpoints, self.metadata, self.t0 = checkpoints or {}, metadata or {}, time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def __call__(self, trainer: Any, output: Any) -> None:
        step = trainer.n_training_steps + 1  # this step is done; sae-lens advances the count after it
        if step in self.checkpoints:
            self._checkpoint(trainer, step, self.checkpoints[step])
        if step % self.every:
            return
        scalars = trainer.build_train_step_log_dict(output=output, n_training_samples=trainer.n_training_samples)
        row = {"step": step, **{k.rsplit("/", 1)[-1]: float(v) for k, v in scalars.items() if is_number(v)}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.tracker.log(row)

    def _checkpoint(self, trainer: Any, step: int, fraction: float) -> None:
        began = time.perf_counter()
        fit_s = began - self.t0
        sae = copy.deepcopy(trainer.sae)
        if trainer.activation_scaler.scaling_factor is not None:  # as sae-lens folds it at the end of fit()
            sae.fold_activation_norm_scaling_factor(trainer.activation_scaler.scaling_factor)
        save_inference(sae, self.out / "checkpoints" / f"{fraction:g}",
                       {**self.metadata, "checkpoint_fraction": fraction, "checkpoint_step": step,
                        "fit_seconds": round(fit_s, 4), "samples": trainer.n_training_samples})
        log.info("checkpoint at %g of training (step %d, %.1f s of fitting)", fraction, step, fit_s)
        self.t0 += time.perf_counter() - began  # writing checkpoints is not fitting time


def _recording_trainer(tcfg: Any, sae: Any, activations: Iterator[torch.Tensor], record: StepRecorder | None) -> Any:
    """sae-lens's trainer, calling `record(trainer, output)` after each step (its public `step` seam)."""
    from sae_lens.training.sae_trainer import SAETrainer

    class RecordingTrainer(SAETrainer):
        def step(self, batch: torch.Tensor) -> Any:
            output = super().step(batch)
            if record is not None:
                record(self, output)
            return output

    return RecordingTrainer(tcfg, sae, activations)


def fit_sae(activations: Iterator[torch.Tensor], d_in: int, cfg: SAETrainConfig, metadata: dict[str, Any],
            total: int | None = None, stats: tuple[torch.Tensor, float] | None = None,
            record: StepRecorder | None = None) -> Any:
    """Train on an iterator of (batch_tokens, d_in) activation batches; returns the trained training-SAE.

    total: training samples (default cfg.tokens); stats: (mean activation, mean norm) of the data, which set
    the norm scaling factor sqrt(d_in) / mean norm and initialise b_dec at the scaled mean (else sae-lens
    estimates the factor on 20 batches and b_dec starts at 0); record: called after every step."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    torch.manual_seed(cfg.seed)
    sae = training_sae(cfg.architecture, d_in, cfg, metadata)
    total = cfg.tokens if total is None else total
    steps = total // cfg.batch_tokens
    tcfg = SAETrainerConfig(total_training_samples=total, train_batch_size_samples=cfg.batch_tokens, lr=cfg.lr,
                            lr_end=cfg.lr / 10, lr_scheduler_name="constant", lr_decay_steps=steps // 5,
                            device=cfg.device or "cpu", n_batches_for_norm_estimate=20,
                            dead_feature_window=cfg.dead_window, feature_sampling_window=max(cfg.dead_window, 200),
                            logger=LoggingConfig(log_to_wandb=False))
    trainer = _recording_trainer(tcfg, sae, activations, record)
    if stats is not None:
        mean, mean_norm = stats
        factor = math.sqrt(d_in) / mean_norm
        trainer.activation_scaler.scaling_factor = factor
        with torch.no_grad():
            sae.b_dec.copy_(mean.to(sae.b_dec) * factor)
    return trainer.fit()


def _cache_key(lm: Any, point: Any, cfg: SAETrainConfig, policy: PositionPolicy, split: str, rows: int) -> Path:
    key = json.dumps([lm.fingerprint["id"], point.name, cfg.corpus, cfg.seq_len, cfg.holdout_fraction,
                      policy.to_json(), split, rows])
    return cache_dir() / "activations" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"


@torch.no_grad()
def collect_activations(model: torch.nn.Module, point: Any, rows: torch.Tensor, policy: PositionPolicy,
                        batch: int, desc: str = "activations") -> torch.Tensor:
    """Activations (N, d) fp16 at `point` over `rows` (R, T), at the positions `policy` splices only."""
    dev = next(model.parameters()).device
    out = []
    for i in tqdm(range(0, len(rows), batch), desc=desc, unit="batch", disable=None):
        ids = rows[i:i + batch]
        x = run_to_hook(model, point, ids.to(dev)).float().cpu()  # (b, T, d)
        keep = policy.keep_in_rows(ids, x)
        out.append(x[~keep].half())
    return torch.cat(out)


def cached_activations(lm: Any, point: Any, rows: torch.Tensor, cfg: SAETrainConfig, policy: PositionPolicy,
                       split: str) -> torch.Tensor:
    """`collect_activations`, cached on disk by model, hook, corpus, policy and rows (unless
    `cfg.cache_activations` is off)."""
    path = _cache_key(lm, point, cfg, policy, split, len(rows)) if cfg.cache_activations else None
    if path is not None and path.is_file():
        log.info("reusing cached %s activations %s", split, path)
        return torch.from_numpy(np.load(path))
    acts = collect_activations(lm.model, point, rows, policy, cfg.model_batch, desc=f"{split} activations")
    if path is None:
        return acts
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, acts.numpy())
    tmp.replace(path)
    return acts


def drop_sinks(policy: PositionPolicy, acts: torch.Tensor, val: torch.Tensor, ratio: float
               ) -> tuple[PositionPolicy, torch.Tensor, torch.Tensor]:
    """Set the policy's `keep_norm_above` to ratio x the median activation norm and drop those activations."""
    norms = acts[:: max(1, len(acts) // 100_000)].float().norm(dim=-1)
    threshold = round(ratio * float(norms.median()), 1)
    policy = replace(policy, keep_norm_above=threshold)
    keep_a, keep_v = acts.float().norm(dim=-1) <= threshold, val.float().norm(dim=-1) <= threshold
    log.info("massive activations (norm > %.1f, %g x the median): %d of %d training and %d of %d held-out "
             "positions stay original", threshold, ratio, int((~keep_a).sum()), len(acts), int((~keep_v).sum()),
             len(val))
    return policy, acts[keep_a], val[keep_v]


def epoch_batches(acts: torch.Tensor, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless fp32 (batch, d) batches over `acts`, each epoch in a fresh seeded order."""
    if len(acts) < batch:
        raise ConfigError(f"{len(acts)} activations are fewer than one batch of {batch}: raise --tokens")
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(acts), generator=gen)
        for j in range(0, len(order) - batch + 1, batch):
            yield acts[order[j:j + batch]].float()


@torch.no_grad()
def sae_quality(sae: Any, acts: torch.Tensor, chunk: int = 8192) -> dict[str, float]:
    """Held-out FVU, mean L0 and dead latents (never active on `acts`) of an inference SAE; acts (N, d)."""
    sse, l0, active, n = 0.0, 0.0, None, len(acts)
    mean = acts.float().mean(0)
    sst = float((acts.float() - mean).pow(2).sum())
    for i in range(0, n, chunk):
        x = acts[i:i + chunk].float()
        z = sae.encode(x)
        sse += float((x - sae.decode(z)).pow(2).sum())
        fired = z > 0
        l0 += float(fired.sum())
        active = fired.any(0) if active is None else active | fired.any(0)
    return {"fvu": sse / sst, "l0": l0 / n, "dead_latents": int((~active).sum()), "d_sae": int(active.numel()),
            "tokens": int(n)}


def save_inference(training: Any, out: Path, extra_metadata: dict[str, Any]) -> Any:
    """Write the inference SAE as a sae-lens folder with `extra_metadata` merged into cfg.json's metadata."""
    from sae_lens import SAE

    training.save_inference_model(out)
    cfg_path = out / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("metadata", {}).update(extra_metadata)
    cfg_path.write_text(json.dumps(cfg, indent=1, default=str))
    return SAE.load_from_disk(out)


def ce_cost(lm: Any, folder: Path, rows: torch.Tensor) -> dict[str, float]:
    """CE of the base model and with the SAE at `folder` spliced (replace mode, under its policy) over held-out
    `rows`, and their difference: FVU alone does not tell what a splice costs (Gemma 3: FVU 0.08, 0.7 nats)."""
    if not len(rows):
        return {}
    from saelora.adapters.saes import load_sae

    from .evaluate import evaluate

    sae = load_sae(lm.model, str(folder), tokenizer=lm.tokenizer)
    with torch.no_grad():
        r = evaluate(lm.model, [sae], rows.to(next(lm.model.parameters()).device), adapter=False)
    return {"ce_base": r.ce_base, "ce_spliced": r.ce_spliced, "ce_cost": r.ce_spliced - r.ce_base,
            "ce_tokens": r.tokens}


def train_sae(cfg: SAETrainConfig) -> tuple[Path, dict[str, float]]:
    """Train an SAE on the model's activations at `cfg.hook`; returns (folder, held-out quality)."""
    if cfg.architecture not in ARCHITECTURES:
        raise ConfigError(f"architecture must be one of {ARCHITECTURES}, got {cfg.architecture!r}")
    if cfg.log_every <= 0:
        raise ConfigError(f"log_every must be positive, got {cfg.log_every}")
    if any(not 0 < f <= 1 for f in cfg.checkpoints):
        raise ConfigError(f"checkpoints are fractions of training in (0, 1], got {cfg.checkpoints}")
    check_report_to(cfg.report_to)
    t0 = time.perf_counter()
    lm = load_model(cfg.model, device=cfg.device)
    cfg = resolved(cfg, lm.model)
    point = resolve_hook(lm.model, cfg.hook)
    policy = apply_override(default_policy(lm.tokenizer), cfg.policy)
    corpus = load_corpus(lm.tokenizer, CorpusConfig(sources=tuple(cfg.corpus), seq_len=cfg.seq_len, seed=cfg.seed,
                                                    val_fraction=cfg.holdout_fraction, prepend_bos=policy.prepend_bos))
    per_row = cfg.seq_len - 2  # about the spliced positions per row (position 0 and an EOS or so are kept)
    train_rows = corpus.train[: -(-cfg.tokens // per_row)]
    val_rows = corpus.val[: -(-cfg.val_tokens // per_row)]
    acts = cached_activations(lm, point, train_rows, cfg, policy, "train")
    val = cached_activations(lm, point, val_rows, cfg, policy, "held-out")
    if cfg.sink_ratio is not None:
        policy, acts, val = drop_sinks(policy, acts, val, cfg.sink_ratio)
    collect_s = time.perf_counter() - t0
    if len(val) < cfg.val_tokens:
        log.warning("only %d held-out activations (asked for %d): raise holdout_fraction or add corpus text",
                    len(val), cfg.val_tokens)
    meta = {"hook_name": point.name, "model_name": cfg.model, "context_size": cfg.seq_len,
            "prepend_bos": policy.prepend_bos, "model_fingerprint": lm.fingerprint["id"], "corpus": list(cfg.corpus),
            POLICY_KEY: policy.to_json()}
    total = len(acts) * cfg.epochs
    log.info("training a %s SAE (%d latents) on %d activations x %d epochs; policy: %s", cfg.architecture,
             cfg.d_sae, len(acts), cfg.epochs, policy.describe())
    sample = acts[torch.randperm(len(acts), generator=torch.Generator().manual_seed(cfg.seed))[:65536]].float()
    stats = (sample.mean(0), float(sample.norm(dim=-1).mean()))
    out = Path(cfg.out)
    tracker = make_tracker(cfg.report_to, out, asdict(cfg))
    try:
        steps = total // cfg.batch_tokens
        marks = {max(1, round(f * steps)): f for f in cfg.checkpoints if 0 < f < 1}
        record = StepRecorder(out, cfg.log_every, tracker, marks, {**meta, "collect_seconds": round(collect_s, 2)})
        trained = fit_sae(epoch_batches(acts, cfg.batch_tokens, cfg.seed), acts.shape[1], cfg, meta, total, stats,
                          record)
        fit_s = time.perf_counter() - record.t0
    finally:
        tracker.close()
    sae = save_inference(trained, out, meta)
    quality = sae_quality(sae, val)
    if quality["fvu"] > 1:
        log.warning("held-out FVU %.2f > 1: the SAE reconstructs worse than the mean activation; check the hook, "
                    "the learning rate and the activation scale", quality["fvu"])
    quality.update(train_seconds=round(time.perf_counter() - t0, 1), collect_seconds=round(collect_s, 1),
                   fit_seconds=round(fit_s, 4),
                   train_activations=len(acts), dead_fraction=quality["dead_latents"] / quality["d_sae"],
                   **ce_cost(lm, out, val_rows[:cfg.ce_rows]))
    save_inference(trained, out, {**meta, **quality, "train_config": asdict(cfg)})
    (out / "train_sae.json").write_text(json.dumps({"config": asdict(cfg), "policy": policy.to_json(),
                                                    "quality": quality}, indent=2))
    log.info("SAE written to %s: held-out FVU %.3f, L0 %.1f, dead %d/%d on %d held-out tokens; spliced CE cost %s",
             out, quality["fvu"], quality["l0"], quality["dead_latents"], quality["d_sae"], quality["tokens"],
             f"{quality['ce_cost']:.3f} nats" if "ce_cost" in quality else "not measured")
    return out, quality
