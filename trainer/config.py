"""Configuration of `saelora train` (and `train-e2e`): every field documented, written next to the output."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from saelora.adapters.config import DEFAULT_CORPUS, DEFAULT_MODEL
from saelora.adapters.errors import ConfigError
from saelora.adapters.lora_targets import TARGET_NAMES
from saelora.adapters.options import opt

from .tracking import ReportTo, check as check_report_to


@dataclass
class LoraSettings:
    """LoRA hyper-parameters as the user gives them (the paper: r=64, alpha=32, q,k,v,o,gate,up,down of all
    layers); nested in `TrainConfig.lora`, and what trainer/lora.py builds a `peft.LoraConfig` from."""

    rank: int = opt(64, "LoRA rank r")
    alpha: float = opt(32.0, "LoRA alpha; the update is scaled by alpha / r", aliases=("--lora-alpha",))
    dropout: float = opt(0.0, "LoRA dropout (0, the default, keeps runs bit-for-bit reproducible; the base model "
                              "always runs in eval mode, so the teacher never sees dropout)")
    rslora: bool = opt(False, "scale alpha/sqrt(r) instead of alpha/r")
    targets: list[str] = opt(factory=lambda: list(TARGET_NAMES),
                             help="short names (mapped per architecture) or literal module-name suffixes",
                             aliases=("--target-modules",))
    layers: str | list[int] = opt("all", '"all" | "after" (layers after the first SAE) | comma list "12,13,14"')
    extra: dict[str, Any] = field(default_factory=dict, metadata={"help": "passed through to peft.LoraConfig",
                                                                  "cli": False})

    def layer_spec(self) -> str | list[int]:
        """"all", "after", or the layer indices."""
        if isinstance(self.layers, str) and self.layers not in ("all", "after"):
            return [int(i) for i in self.layers.split(",") if i.strip()]
        return self.layers


@dataclass
class TrainConfig:
    # what to adapt
    model: str = opt(DEFAULT_MODEL, "base model spec (embedded name, HF folder, .gguf, hub id when online)")
    saes: list[str] = opt(factory=list, help="sae-lens folders (or release:id online); one per hook")
    corpus: list[str] = opt(factory=lambda: [DEFAULT_CORPUS], help="corpus sources (see adapters/corpus.py)")
    val_fraction: float = opt(0.05, "documents held out for evals during training (hash band above the test band)")
    test_fraction: float = opt(0.0, "documents held out for a final test (never used in training or its evals)")
    reserve_fraction: float = opt(0.0, "documents just above the validation band kept out of training and its evals "
                                       "(a fresh test band a study reads once)")
    out: str = opt("runs/lora", "output folder: bundle in out/adapter, metrics, curves, checkpoint, config",
                   aliases=("--output-dir",))
    lora: LoraSettings = opt(factory=lambda: LoraSettings(), help="LoRA settings (the --rank ... --layers options)")
    # optimisation (the paper: AdamW, constant lr, grad-norm clip 1.0)
    lr: float = opt(5e-5, "AdamW learning rate", aliases=("--learning-rate",))
    schedule: str = opt("constant", "constant | cosine | linear (decay to 0 at the end of the budget)")
    warmup_steps: int = opt(0, "linear warm-up steps")
    weight_decay: float = opt(0.0, "AdamW weight decay on the LoRA weights (0: decoupled decay would pull the small "
                                   "adapter back towards the base model, which KL already does)")
    clip: float = opt(1.0, "max grad norm", aliases=("--max-grad-norm",))
    # objective
    kl_reduction: str = opt("mean", "mean: per token; sum: over positions, then mean over rows (the paper's "
                                    "batch-1 x 1024-position sum: gradients T times larger, so clip bites more)")
    ce_weight: float = opt(0.0, "+ ce_weight * CE(student)")
    mse_weight: float = opt(0.0, "+ mse_weight * normalised SAE reconstruction MSE (meaningful with layers=all)")
    policy: str | None = opt(None, "position-policy override for every SAE, e.g. keep_first=0,keep_ids= (default: each"
                                   " SAE's recorded policy, else the paper's: BOS/EOS and a BOS-less sink kept)")
    # budget and batching (a step = batch_size x grad_accum rows of seq_len tokens)
    max_steps: int | None = opt(None, "optimizer steps")
    max_tokens: int | None = opt(None, "training tokens (rounded up to whole steps)", name="train_tokens",
                                 deprecated=("--max-tokens",))
    max_minutes: float | None = opt(None, "training wall-clock budget (eval time excluded)")
    batch_size: int = opt(4, "rows per micro-batch and process (data parallel: the global batch is "
                           "batch_size x processes)")
    seq_len: int = opt(256, "tokens per row")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    seed: int = opt(0, "seeds torch, the data order and the corpus shuffle")
    # evaluation and checkpoints
    eval_interval: int = opt(50, "steps between held-out evals (0: only at the start and end)")
    eval_every_s: float | None = opt(None, "or: seconds of training between evals")
    eval_rows: int = opt(16, "held-out rows per eval")
    checkpoint_interval: int = opt(100, "steps between checkpoints (also written on Ctrl-C and at the end)")
    resume: bool = opt(False, "continue from out/checkpoint")
    device: str | None = opt(None, "default: cuda if available, else cpu")
    report_to: ReportTo = opt("none", "experiment tracking, as the HF Trainer's option: tensorboard writes "
                              "out/tensorboard, trackio out/trackio; the scalars are metrics.jsonl's")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2))

    def total_steps(self, processes: int = 1) -> int | None:
        """Steps from max_steps / max_tokens (the smaller); None if only a time budget is set. A step takes
        batch_size x processes x grad_accum rows (data parallel: the global batch)."""
        per_step = self.batch_size * processes * self.grad_accum * self.seq_len
        candidates = [s for s in (self.max_steps, -(-self.max_tokens // per_step) if self.max_tokens else None)
                      if s is not None]
        return min(candidates) if candidates else None

    def validate(self) -> None:
        if not (self.max_steps or self.max_tokens or self.max_minutes):
            raise ConfigError("set a budget: max_steps, max_tokens or max_minutes")
        if self.schedule not in ("constant", "cosine", "linear"):
            raise ConfigError(f"schedule must be constant, cosine or linear, got {self.schedule!r}")
        if self.kl_reduction not in ("mean", "sum"):
            raise ConfigError(f"kl_reduction must be mean or sum, got {self.kl_reduction!r}")
        if self.schedule != "constant" and self.total_steps() is None:
            raise ConfigError("a decaying schedule needs max_steps or max_tokens")
        if self.lora.rank <= 0:
            raise ConfigError(f"rank must be > 0, got {self.lora.rank}")
        for name in ("batch_size", "seq_len", "grad_accum", "eval_rows"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        check_report_to(self.report_to)
