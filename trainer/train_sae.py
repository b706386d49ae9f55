"""`saelora train-sae`: train an SAE with sae-lens's trainer on activations streamed from a model at a hook.

The forward stops after the hook layer (`run_to_hook`); activations from several forwards are mixed in
a shuffle buffer before they reach the trainer. The result is a sae-lens folder whose metadata names
the hook, model, context size, corpus, and the held-out L0 / FVU / dead latents.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from saelora.adapters.errors import ConfigError

from saelora.adapters.activations import run_to_hook
from saelora.adapters.corpus import CorpusConfig, load_corpus
from saelora.adapters.hooks import resolve_hook
from saelora.adapters.models import load_model

log = logging.getLogger(__name__)
ARCHITECTURES = ("topk", "relu", "jumprelu", "batchtopk")


@dataclass
class SAETrainConfig:
    model: str = "smollm2-135m"  # base model spec
    hook: str = "blocks.15.hook_resid_post"  # where the SAE reads (TransformerLens name or HF module path)
    architecture: str = "topk"  # topk | relu | jumprelu | batchtopk
    d_sae: int = 4608  # number of latents (8x SmolLM2's 576)
    k: int = 32  # active latents per token (topk, batchtopk)
    sparsity_coefficient: float = 5.0  # L1 (relu) or L0 (jumprelu) coefficient
    lr: float = 4e-4  # Adam learning rate (sae-lens trainer)
    tokens: int = 1_000_000  # training activations (tokens)
    batch_tokens: int = 1024  # activations per SAE step
    seq_len: int = 128  # context size of the model forwards
    model_batch: int = 16  # rows per model forward
    buffer_batches: int = 8  # forwards mixed in the shuffle buffer
    skip_first: bool = True  # drop position 0 (attention-sink activations have outlier norms)
    corpus: list[str] = field(default_factory=lambda: ["wiki"])  # corpus sources for activations
    val_rows: int = 32  # held-out rows for FVU / L0 / dead latents
    out: str = "runs/sae"  # the sae-lens folder written
    seed: int = 0  # seeds the SAE init and the activation order
    device: str | None = None  # default: cuda if available, else cpu


def training_sae(arch: str, d_in: int, cfg: SAETrainConfig, metadata: dict[str, Any]) -> Any:
    """A fresh sae-lens training SAE of `arch`."""
    import sae_lens as sl
    from sae_lens.saes.sae import SAEMetadata

    common = dict(d_in=d_in, d_sae=cfg.d_sae, metadata=SAEMetadata(**metadata), device=cfg.device or "cpu",
                  normalize_activations="expected_average_only_in")
    if arch == "topk":
        return sl.TopKTrainingSAE(sl.TopKTrainingSAEConfig(k=cfg.k, **common))
    if arch == "batchtopk":
        return sl.BatchTopKTrainingSAE(sl.BatchTopKTrainingSAEConfig(k=cfg.k, **common))
    if arch == "relu":
        return sl.StandardTrainingSAE(sl.StandardTrainingSAEConfig(l1_coefficient=cfg.sparsity_coefficient, **common))
    if arch == "jumprelu":
        return sl.JumpReLUTrainingSAE(sl.JumpReLUTrainingSAEConfig(l0_coefficient=cfg.sparsity_coefficient, **common))
    raise ConfigError(f"architecture must be one of {ARCHITECTURES}, got {arch!r}")


def fit_sae(activations: Iterator[torch.Tensor], d_in: int, cfg: SAETrainConfig, metadata: dict[str, Any]) -> Any:
    """Train on an iterator of (batch_tokens, d_in) activation batches; returns the trained training-SAE."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(cfg.seed)
    sae = training_sae(cfg.architecture, d_in, cfg, metadata)
    tcfg = SAETrainerConfig(total_training_samples=cfg.tokens, train_batch_size_samples=cfg.batch_tokens, lr=cfg.lr,
                            lr_end=cfg.lr / 10, lr_scheduler_name="constant", device=cfg.device or "cpu",
                            n_batches_for_norm_estimate=20, dead_feature_window=200, feature_sampling_window=400,
                            logger=LoggingConfig(log_to_wandb=False))
    return SAETrainer(tcfg, sae, activations).fit()


def stream_activations(model: torch.nn.Module, point: Any, rows: torch.Tensor, cfg: SAETrainConfig,
                       ) -> Iterator[torch.Tensor]:
    """Endless (batch_tokens, d) batches of activations at `point` over `rows`, shuffled in a buffer."""
    gen = torch.Generator().manual_seed(cfg.seed)
    while True:
        order = torch.randperm(len(rows), generator=gen)
        for start in range(0, len(order), cfg.model_batch * cfg.buffer_batches):
            chunk = rows[order[start:start + cfg.model_batch * cfg.buffer_batches]]
            acts = []
            with torch.no_grad():
                for i in range(0, len(chunk), cfg.model_batch):
                    x = run_to_hook(model, point, chunk[i:i + cfg.model_batch])  # (b, T, d)
                    acts.append((x[:, 1:] if cfg.skip_first else x).reshape(-1, x.shape[-1]))
            buf = torch.cat(acts)
            buf = buf[torch.randperm(len(buf), generator=gen)]
            for j in range(0, len(buf) - cfg.batch_tokens + 1, cfg.batch_tokens):
                yield buf[j:j + cfg.batch_tokens]


@torch.no_grad()
def sae_quality(sae: Any, acts: torch.Tensor) -> dict[str, float]:
    """Held-out FVU, mean L0 and dead latents (never active on `acts`) of an inference SAE; acts (N, d)."""
    z = sae.encode(acts)
    recon = sae.decode(z)
    fvu = (acts - recon).pow(2).sum() / (acts - acts.mean(0)).pow(2).sum()
    active = (z > 0)
    return {"fvu": float(fvu), "l0": float(active.sum(-1).float().mean()),
            "dead_latents": int((~active.any(0)).sum()), "d_sae": int(z.shape[-1]), "tokens": int(len(acts))}


def save_inference(training: Any, out: Path, extra_metadata: dict[str, Any]) -> Any:
    """Write the inference SAE as a sae-lens folder with `extra_metadata` merged into cfg.json's metadata."""
    from sae_lens import SAE

    training.save_inference_model(out)
    cfg_path = out / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("metadata", {}).update(extra_metadata)
    cfg_path.write_text(json.dumps(cfg, indent=1, default=str))
    return SAE.load_from_disk(out)


def train_sae(cfg: SAETrainConfig) -> tuple[Path, dict[str, float]]:
    """Train an SAE on the model's activations at `cfg.hook`; returns (folder, held-out quality)."""
    if cfg.architecture not in ARCHITECTURES:
        raise ConfigError(f"architecture must be one of {ARCHITECTURES}, got {cfg.architecture!r}")
    t0 = time.perf_counter()
    lm = load_model(cfg.model, device=cfg.device)
    point = resolve_hook(lm.model, cfg.hook)
    corpus = load_corpus(lm.tokenizer, CorpusConfig(sources=tuple(cfg.corpus), seq_len=cfg.seq_len, seed=cfg.seed))
    dev = next(lm.model.parameters()).device
    meta = {"hook_name": point.name, "model_name": cfg.model, "context_size": cfg.seq_len,
            "model_fingerprint": lm.fingerprint["id"], "corpus": list(cfg.corpus)}
    d_in = lm.model.config.hidden_size
    trained = fit_sae(stream_activations(lm.model, point, corpus.train.to(dev), cfg), d_in, cfg, meta)
    with torch.no_grad():
        val = run_to_hook(lm.model, point, corpus.val[: cfg.val_rows].to(dev))
    val = (val[:, 1:] if cfg.skip_first else val).reshape(-1, d_in)
    out = Path(cfg.out)
    sae = save_inference(trained, out, meta)
    quality = sae_quality(sae.to(dev), val)
    quality["train_seconds"] = round(time.perf_counter() - t0, 1)
    save_inference(trained, out, {**meta, **quality, "train_config": asdict(cfg)})
    (out / "train_sae.json").write_text(json.dumps({"config": asdict(cfg), "quality": quality}, indent=2))
    log.info("SAE written to %s: held-out FVU %.3f, L0 %.1f, dead %d/%d", out, quality["fvu"], quality["l0"],
             quality["dead_latents"], quality["d_sae"])
    return out, quality
