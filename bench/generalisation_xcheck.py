"""Cross-check bench/generalisation.py's spliced CE per genre against an independent path: plain transformers and
sae-lens `SAE.load_from_disk`, the SAE's position policy applied by hand (train_gap_xcheck's hook), on the same
held-out rows. Only the rows come from saelora.

    python bench/generalisation_xcheck.py [--model smollm2-135m] [--rows 32]   # ~3 min

Writes bench/results/generalisation_xcheck.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from sae_lens import SAE
from train_gap_xcheck import plain_ce, splice_hook
from transformers import AutoModelForCausalLM

from saelora.adapters.config import demo_dir
from saelora.adapters.corpus import CorpusConfig, load_corpus
from saelora.adapters.genres import GENRE_NAMES
from saelora.adapters.models import embedded_model_dir, load_model
from saelora.adapters.saes import load_sae
from saelora.trainer.evaluate import evaluate

RESULTS = Path(__file__).parent / "results"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", type=int, default=32)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)
    sae_dir = demo_dir(args.model) / "sae"
    lm = load_model(args.model)
    s = load_sae(lm.model, str(sae_dir), tokenizer=lm.tokenizer)
    meta = json.loads((sae_dir / "cfg.json").read_text())["metadata"]
    plain = AutoModelForCausalLM.from_pretrained(embedded_model_dir(args.model), dtype=torch.float32).eval()
    sae = SAE.load_from_disk(str(sae_dir)).eval()
    current: dict = {}
    hook_fn = splice_hook(sae, meta["saelora_policy"], current)
    layer = int(meta["hook_name"].split(".")[1])
    out = {"model": args.model, "rows": args.rows, "genres": {}}
    for genre in GENRE_NAMES:  # the demo adapter's bands, as bench/generalisation.py reads them
        cfg = CorpusConfig(sources=(genre,), seq_len=128, val_fraction=0.03, test_fraction=0.07,
                           prepend_bos=s.policy.prepend_bos)
        rows = load_corpus(lm.tokenizer, cfg).val[:args.rows]
        with torch.no_grad():
            mine = evaluate(lm.model, [s], rows, 4, adapter=False).to_json()
        ref = {"ce_base": plain_ce(plain, rows, None, hook_fn, current),
               "ce_spliced": plain_ce(plain, rows, layer, hook_fn, current)}
        out["genres"][genre] = {"saelora": {k: mine[k] for k in ref}, "independent": ref,
                                "max_abs_diff": max(abs(mine[k] - ref[k]) for k in ref)}
        logging.info("%s: %s", genre, out["genres"][genre])
    (RESULTS / "generalisation_xcheck.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
