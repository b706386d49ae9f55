"""What `train` and `train-e2e` share before and after their loops: the validated run folder, the frozen model,
SAEs and corpus (`prepare`), the prefix teacher and student share (`shared_prefix_point`), and the manifest of
what was trained (`manifest_for`). Library code: the commands (train.py, e2e.py) import it, never each other."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from saelora.adapters.bundle import BundleManifest
from saelora.adapters.corpus import CorpusConfig, PackedCorpus, load_corpus
from saelora.adapters.errors import ConfigError
from saelora.adapters.models import LoadedModel, load_model
from saelora.adapters.policy import corpus_bos
from saelora.adapters.saes import LoadedSAE, load_sae

from .config import TrainConfig
from .distributed import DataParallel
from .loop import LoopState
from .objective import first_splice_point

log = logging.getLogger(__name__)


@dataclass
class Setup:
    out: Path
    lm: LoadedModel
    saes: list[LoadedSAE]
    corpus: PackedCorpus
    dp: DataParallel  # this process's rank among the launched ones (one process: rank 0 of 1)


def prepare(cfg: TrainConfig) -> Setup:
    """Validate `cfg`, join the launcher's process group if any, create the output folder with its resolved
    config.json (rank 0), seed torch, and load the model, the SAEs (frozen) and the packed corpus."""
    cfg.validate()
    if not cfg.saes:
        raise ConfigError("at least one SAE is needed (--sae PATH)")
    dp = DataParallel.from_launch(cfg.device)
    out = Path(cfg.out)
    if dp.is_main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.json")
    dp.barrier()
    torch.manual_seed(cfg.seed)  # the same on every rank: the LoRA weights start alike
    lm = load_model(cfg.model, device=dp.device or cfg.device)
    lm.model.requires_grad_(False)
    saes = [load_sae(lm.model, spec, tokenizer=lm.tokenizer, policy=cfg.policy) for spec in cfg.saes]
    for s in saes:
        log.info("SAE %s spliced at %s", s.name, s.policy.describe())
    corpus = load_corpus(lm.tokenizer, CorpusConfig(sources=tuple(cfg.corpus), seq_len=cfg.seq_len, seed=cfg.seed,
                                                    val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                                                    reserve_fraction=cfg.reserve_fraction,
                                                    prepend_bos=corpus_bos([s.policy for s in saes])))
    if -(-min(len(corpus.val), cfg.eval_rows) // cfg.batch_size) < dp.world:
        raise ConfigError(f"{min(len(corpus.val), cfg.eval_rows)} validation rows make fewer eval batches of "
                          f"{cfg.batch_size} than the {dp.world} processes: lower --batch-size or add text")
    dev = next(lm.model.parameters()).device
    corpus.train, corpus.val = corpus.train.to(dev), corpus.val[: cfg.eval_rows].to(dev)
    return Setup(out, lm, saes, corpus, dp)


def shared_prefix_point(model: torch.nn.Module, saes: list[LoadedSAE], layers: list[int] | None):
    """The first SAE's hook point when no adapted layer runs before it (teacher and student share it)."""
    first = first_splice_point(saes)
    if first is None or layers is None or min(layers) < first.depth:
        return None
    return first


def manifest_for(cfg: TrainConfig, setup: Setup, st: LoopState, wall_s: float) -> BundleManifest:
    final = st.evals[-1] if st.evals else {}
    return BundleManifest(
        base_model={"spec": cfg.model, "fingerprint": setup.lm.fingerprint},
        saes=[s.describe() for s in setup.saes],
        lora={"layers": cfg.lora.layers},
        training={"config": cfg.to_json(), "processes": setup.dp.world, "steps": st.step, "tokens_seen": st.tokens,
                  "train_seconds": round(st.train_s, 1), "wall_seconds": round(wall_s, 1),
                  "corpus": setup.corpus.info},
        metrics={"final": final, "history": st.evals},
    )
