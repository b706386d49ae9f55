"""Cross-check `saelora eval` against an independent path: plain transformers, sae-lens `SAE.load_from_disk`
and PEFT `PeftModel.from_pretrained`, with the SAE's position policy (from its cfg metadata) applied by hand in
a forward hook. Only the corpus rows and file locations come from saelora; the splice, the adapter and the CE
are computed here. The two paths must agree to float precision.

    python bench/train_gap_xcheck.py [--adapter DIR] [--rows 16] [--out FILE]

Writes bench/results/train_gap_xcheck.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from peft import PeftModel
from sae_lens import SAE
from transformers import AutoModelForCausalLM

from saelora.adapters.bundle import attach_bundle, load_bundle
from saelora.adapters.config import cache_dir
from saelora.adapters.corpus import CorpusConfig, load_corpus
from saelora.adapters.models import embedded_model_dir, load_model
from saelora.adapters.policy import corpus_bos
from saelora.adapters.saes import load_sae, shipped_sae
from saelora.trainer.evaluate import evaluate

log = logging.getLogger("train_gap_xcheck")
RESULTS = Path(__file__).parent / "results"
DEFAULT_ADAPTER = cache_dir() / "bench" / "train_gap" / "lora_after-lr0.002-s0" / "adapter"


def splice_hook(sae: SAE, policy: dict, current: dict):
    """Forward hook replacing the layer output by the SAE reconstruction except where the policy keeps it."""
    keep_ids = torch.tensor(policy["keep_token_ids"])

    def hook(_mod, _args, out):
        h = out[0] if isinstance(out, tuple) else out
        keep = torch.zeros(h.shape[:2], dtype=torch.bool)
        keep[:, 0] = policy["keep_first"]
        keep |= torch.isin(current["ids"], keep_ids)
        if policy.get("keep_norm_above") is not None:
            keep |= h.norm(dim=-1) > policy["keep_norm_above"]
        y = torch.where(keep[..., None], h, sae.decode(sae.encode(h)))
        return (y, *out[1:]) if isinstance(out, tuple) else y

    return hook


def plain_ce(model, rows: torch.Tensor, layer: int | None, hook_fn, current: dict, batch: int = 4) -> float:
    """Mean next-token CE over rows; with `layer`, `hook_fn` is registered on that decoder layer."""
    inner = model.base_model.model if isinstance(model, PeftModel) else model
    handle = inner.model.layers[layer].register_forward_hook(hook_fn) if layer is not None else None
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            ids = rows[i:i + batch]
            current["ids"] = ids
            logits = model(input_ids=ids).logits
            total += float(torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="sum"))
            n += ids[:, 1:].numel()
    if handle:
        handle.remove()
    return total / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", default=str(DEFAULT_ADAPTER))
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--band", choices=("test", "reserve"), default="test",
                    help="the run's band to read: test, or reserve (the train_gap v2 study's test band)")
    ap.add_argument("--corpus", nargs="+", help="read the band of these sources instead of the run's own corpus "
                    "(same fractions), e.g. a genre the run never saw")
    ap.add_argument("--out", default=str(RESULTS / "train_gap_xcheck.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    adapter = Path(args.adapter)
    run_cfg = json.loads((adapter.parent / "config.json").read_text())
    sae_dir = run_cfg["saes"][0] if run_cfg.get("saes") else ""
    if not Path(sae_dir).is_dir():  # e.g. the shipped SAE's folder moved since the run; the bundle checks its hash
        sae_dir = str(shipped_sae(run_cfg["model"]))
    lm = load_model(run_cfg["model"])
    lm.model.requires_grad_(False)
    s = load_sae(lm.model, sae_dir, tokenizer=lm.tokenizer)
    # rows as the adapter was trained and evaluated on: starting with BOS when the SAE's policy says so (Gemma)
    corpus_cfg = CorpusConfig(sources=tuple(args.corpus or run_cfg["corpus"]), seq_len=run_cfg["seq_len"],
                              val_fraction=run_cfg["val_fraction"],
                              test_fraction=run_cfg["test_fraction"],
                              reserve_fraction=run_cfg.get("reserve_fraction", 0.0), prepend_bos=corpus_bos([s.policy]))
    rows = getattr(load_corpus(lm.tokenizer, corpus_cfg), args.band)[:args.rows]
    mine = evaluate(attach_bundle(lm.model, load_bundle(str(adapter), lm.fingerprint, [s], lm.model), "adapter"),
                    [s], rows, 4).to_json()

    meta = json.loads((Path(sae_dir) / "cfg.json").read_text())["metadata"]
    layer = int(meta["hook_name"].split(".")[1])
    plain = AutoModelForCausalLM.from_pretrained(embedded_model_dir(run_cfg["model"]), dtype=torch.float32).eval()
    sae = SAE.load_from_disk(sae_dir).eval()
    current: dict = {}
    hook_fn = splice_hook(sae, meta["saelora_policy"], current)
    ref = {"ce_base": plain_ce(plain, rows, None, hook_fn, current),
           "ce_spliced": plain_ce(plain, rows, layer, hook_fn, current)}
    ref["ce_adapted"] = plain_ce(PeftModel.from_pretrained(plain, str(adapter)).eval(), rows, layer, hook_fn, current)

    keys = ("ce_base", "ce_spliced", "ce_adapted")
    res = {"adapter": str(adapter), "corpus": list(corpus_cfg.sources), "band": args.band, "rows": int(len(rows)),
           "tokens": int(rows[:, 1:].numel()),
           "saelora": {k: round(float(mine[k]), 5) for k in keys}, "plain": {k: round(ref[k], 5) for k in keys},
           "max_abs_diff": round(max(abs(float(mine[k]) - ref[k]) for k in keys), 6)}
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    log.info(json.dumps(res, indent=2))
    return 0 if res["max_abs_diff"] < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
