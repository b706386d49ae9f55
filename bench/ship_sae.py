"""Ship a trained SAE inside the package: fp16 weights, its policy and its held-out quality measured as shipped.

    saelora train-sae --hook blocks.12.hook_resid_post --d-sae 4608 --k 64 --epochs 3 --tokens 1000000 --corpus mix \\
        --out runs/sae-L12-k64
    python bench/ship_sae.py runs/sae-L12-k64            # -> cli/data/saes/smollm2-135m-L12-topk
    python bench/ship_sae.py runs/gemma-sae --model gemma3-270m   # -> cli/data/saes/gemma3-270m-L7-topk

The quality record (FVU, L0, dead latents over >= 100k held-out activations at the positions the policy
splices) is measured again here on the fp16 weights as they are shipped, with sae-lens's own SAE class, and
written into cfg.json's metadata (`fvu`, `dead_latents`, ...) and bench/results/shipped_sae.json (SmolLM2;
other models: shipped_sae_<model>.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import torch

log = logging.getLogger("bench.ship_sae")
RESULTS = Path(__file__).parent / "results"


def plain_fvu(lm, sae, rows: torch.Tensor, policy, layer: int) -> float:  # noqa: ANN001
    """FVU by an independent path: plain transformers hidden states and sae-lens's forward, masks by hand."""
    xs = []
    for i in range(0, len(rows), 16):
        ids = rows[i:i + 16]
        h = lm.model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1]  # output of layer L
        keep = torch.zeros(ids.shape, dtype=torch.bool)
        keep[:, 0] = policy.keep_first
        for t in policy.keep_token_ids:
            keep |= ids == t
        if policy.keep_norm_above is not None:
            keep |= h.norm(dim=-1) > policy.keep_norm_above
        xs.append(h[~keep])
    x = torch.cat(xs)
    return float((x - sae(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def per_genre(lm, sae, dst: Path, tcfg, policy, point, rows: int) -> dict[str, dict]:  # noqa: ANN001
    """FVU, L0 and the CE cost of the splice on each genre's own held-out band (same hash bands as training);
    `sae`: the shipped weights at `dst`, loaded."""
    from saelora.adapters.corpus import CorpusConfig, load_corpus
    from saelora.adapters.genres import GENRE_NAMES
    from saelora.trainer.train_sae import cached_activations, ce_cost, sae_quality

    base = replace(policy, keep_norm_above=None)
    out = {}
    for genre in GENRE_NAMES:
        gcfg = replace(tcfg, corpus=[genre])
        val = load_corpus(lm.tokenizer, CorpusConfig(sources=(genre,), seq_len=tcfg.seq_len, seed=tcfg.seed,
                                                     val_fraction=tcfg.holdout_fraction,
                                                     prepend_bos=base.prepend_bos)).val
        acts = cached_activations(lm, point, val[: -(-tcfg.val_tokens // 3 // (tcfg.seq_len - 2))], gcfg, base,
                                  "held-out")
        kept = acts[acts.float().norm(dim=-1) <= policy.keep_norm_above] if policy.keep_norm_above else acts
        q = sae_quality(sae, kept)
        out[genre] = {"fvu": q["fvu"], "l0": q["l0"], "tokens": q["tokens"], **ce_cost(lm, dst, val[:rows])}
        log.info("%s held-out: FVU %.4f on %d activations, CE cost %.3f nats on %d tokens", genre, q["fvu"],
                 q["tokens"], out[genre]["ce_cost"], out[genre]["ce_tokens"])
    return out


def main() -> int:
    from safetensors.torch import load_file, save_file
    from sae_lens import SAE

    from saelora.adapters.corpus import CorpusConfig, load_corpus
    from saelora.adapters.hooks import resolve_hook
    from saelora.adapters.models import load_model
    from saelora.adapters.policy import POLICY_KEY, PositionPolicy
    from saelora.adapters.saes import SHIPPED_SAES, shipped_sae
    from saelora.trainer.train_sae import SAETrainConfig, cached_activations, drop_sinks, sae_quality

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="the SAE folder train-sae wrote")
    p.add_argument("--model", default="smollm2-135m", choices=sorted(SHIPPED_SAES))
    p.add_argument("--sink-ratio", type=float, default=5.0, help="keep_norm_above = ratio x median norm")
    p.add_argument("--ce-rows", type=int, default=64, help="held-out rows per genre for the CE cost of the splice")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    src, dst = Path(args.folder), shipped_sae(args.model)
    cfg_json = json.loads((src / "cfg.json").read_text())
    meta = cfg_json["metadata"]
    tcfg = SAETrainConfig(**meta["train_config"])
    lm = load_model(tcfg.model)
    point = resolve_hook(lm.model, tcfg.hook)
    trained = PositionPolicy.from_json(meta[POLICY_KEY])
    base = replace(trained, keep_norm_above=None)  # the policy the activation cache was collected under
    corpus = load_corpus(lm.tokenizer, CorpusConfig(sources=tuple(tcfg.corpus), seq_len=tcfg.seq_len, seed=tcfg.seed,
                                                    val_fraction=tcfg.holdout_fraction, prepend_bos=base.prepend_bos))
    per_row = tcfg.seq_len - 2
    acts = cached_activations(lm, point, corpus.train[: -(-tcfg.tokens // per_row)], tcfg, base, "train")
    val = cached_activations(lm, point, corpus.val[: -(-tcfg.val_tokens // per_row)], tcfg, base, "held-out")
    policy, _, val_kept = drop_sinks(base, acts, val, args.sink_ratio)
    if trained.keep_norm_above is not None:
        policy = trained  # trained with the filter already: keep its threshold
    dst.mkdir(parents=True, exist_ok=True)
    weights = load_file(str(src / "sae_weights.safetensors"))
    save_file({k: v.half() for k, v in weights.items()}, str(dst / "sae_weights.safetensors"))
    shutil.copy(src / "cfg.json", dst / "cfg.json")
    sae = SAE.load_from_disk(dst, dtype="float32")  # the shipped fp16 weights, computed in fp32
    as_trained = {k: meta.get(k) for k in ("fvu", "l0", "dead_latents")}
    quality = sae_quality(sae, val_kept)
    quality["fvu_plain_transformers_check"] = plain_fvu(lm, sae, corpus.val[:160], policy, point.layer)
    quality["dead_fraction"] = quality["dead_latents"] / quality["d_sae"]
    quality["massive_activations_kept_original"] = int(len(val) - len(val_kept))
    meta.update({POLICY_KEY: policy.to_json(), **quality, "weights": "fp16 (computed in fp32)",
                 "shipped_from": str(src)})
    (dst / "cfg.json").write_text(json.dumps(cfg_json, indent=1, default=str))
    quality["per_genre"] = per_genre(lm, sae, dst, tcfg, policy, point, args.ce_rows)
    meta["per_genre"] = quality["per_genre"]
    (dst / "cfg.json").write_text(json.dumps(cfg_json, indent=1, default=str))
    record = {"folder": str(dst.relative_to(Path.cwd())) if dst.is_relative_to(Path.cwd()) else str(dst),
              "policy": policy.to_json(), "quality": quality, "train_config": meta["train_config"],
              "train_seconds": meta.get("train_seconds"), "quality_as_trained_fp32_before_the_norm_filter": as_trained,
              "targets": {"fvu_max": 0.15, "fvu_max_per_genre": 0.22, "dead_fraction_max": 0.05,
                          "held_out_tokens_min": 100_000}}
    RESULTS.mkdir(exist_ok=True)
    name = "shipped_sae.json" if args.model == "smollm2-135m" else f"shipped_sae_{args.model}.json"
    (RESULTS / name).write_text(json.dumps(record, indent=2, default=str))
    log.info("shipped %s: FVU %.4f, L0 %.1f, dead %d/%d (%.1f%%) on %d held-out activations; policy: %s", dst,
             quality["fvu"], quality["l0"], quality["dead_latents"], quality["d_sae"],
             100 * quality["dead_fraction"], quality["tokens"], policy.describe())
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    torch.set_grad_enabled(False)
    sys.exit(main())
