"""Latent-choice pilot (recorded; not rerun by CI): which of concept search's latents to steer with, decided on
SmolLM2's development concepts only.

Concept search ranks latents by how much more they fire on the concept's texts; a latent that fires on a concept
need not write it. Re-ranking the search's top 20 by what each latent writes is compared with the search's own
top latent:
    smd      concept search's best (standardised mean difference): the benchmark's `latent_add`
    cosine   the one of the top 20 whose decoder row points most along the DiffMean vector
    lens     the one whose 20 promoted tokens (logit lens) are most often the concept's frequent tokens
Each as `add` at 0.3 and 0.4 norm on all positions, 12 prompts x 2 samples, the benchmark's judge.

    python bench/latent_choice_pilot.py     # ~5 min: bench/results/latent_choice_pilot.{json,md}
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import Counter
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
log = logging.getLogger("bench.latent_choice_pilot")


def _choices(lm, sae, suite, concept, pos, neg) -> dict[str, int]:
    from saelora.adapters.logit_lens import top_logits
    from saelora.adapters.steering import concept_latents, diffmean

    top = [r.feature for r in concept_latents(pos, neg, n=20)]
    v = diffmean(pos, neg)
    w = sae.sae.W_dec.detach().float()[top]
    cos = (w @ v / (w.norm(dim=-1) * v.norm())).tolist()

    def freq(texts):
        toks = Counter(lm.tokenizer.decode([i]).strip().lower() for t in texts
                       for i in lm.tokenizer(t, add_special_tokens=False)["input_ids"][:64])
        n = sum(toks.values())
        return {k: c / n for k, c in toks.items()}
    fa, fb = freq(suite.texts(concept, "search", 48)), freq(suite.others(concept, "search", 96))
    lens = []
    for promoted, _ in top_logits(lm.model, sae, 20, indices=top):
        words = [lm.tokenizer.decode([i]).strip().lower() for i, _ in promoted]
        words = [x for x in words if x]
        lens.append(sum(fa.get(x, 0.0) > fb.get(x, 0.0) for x in words) / max(1, len(words)))
    return {"smd": top[0], "cosine": top[max(range(len(top)), key=lambda i: cos[i])],
            "lens": top[max(range(len(top)), key=lambda i: (lens[i], -i))]}


def main() -> None:
    from saelora.adapters.edits import LatentEdit
    from saelora.adapters.models import load_model
    from saelora.adapters.saes import load_sae
    from saelora.adapters.splice_hooks import Splice
    from saelora.adapters.steering import read_texts
    from saelora.adapters.units import to_raw
    from saelora.trainer.concepts import DEV_CONCEPTS, load_suite
    from saelora.trainer.run_steer_eval import _max_act, _sae_folder
    from saelora.trainer.steer_eval import Runner, SteerEvalConfig, fit_judge, plan

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    cfg = SteerEvalConfig(model="smollm2-135m")
    lm = load_model(cfg.model)
    sae = load_sae(lm.model, _sae_folder(cfg.model), tokenizer=lm.tokenizer)
    max_act = _max_act(lm, sae, _sae_folder(cfg.model))
    suite = load_suite("wiki")
    judge, _ = fit_judge(suite)
    splice = Splice(lm.model, [sae], mode="error_term")
    rows = []
    for concept in DEV_CONCEPTS:
        p = plan(lm, sae, suite, concept, max_act, cfg)
        pos = read_texts(lm.model, lm.tokenizer, sae, suite.texts(concept, "search", 48), 64)
        neg = read_texts(lm.model, lm.tokenizer, sae, suite.others(concept, "search", 96), 64)
        picks = _choices(lm, sae, suite, concept, pos, neg)
        splice.install()
        runner = Runner(lm, splice, judge, cfg, "error_term", contextlib.nullcontext)
        grid = [(rule, f, s) for rule, f in picks.items() for s in (0.3, 0.4)]
        res = runner.run_each(p, [[LatentEdit(sae.name, f, "add", to_raw(s, "norm", p.scales, feature=f))]
                                  for _, f, s in grid], suite.prompts)
        splice.remove()
        for (rule, f, s), r in zip(grid, res, strict=True):
            rows.append({"target": concept, "rule": rule, "feature": f, "strength": s,
                         **{k: r[k] for k in ("concept", "fluency_gap", "distinct2", "success")}})
            log.info("%s", rows[-1])
    (RESULTS / "latent_choice_pilot.json").write_text(json.dumps(rows, indent=1))
    md = ["# Latent-choice pilot (SmolLM2, development concepts)", "", __doc__.split("\n\n")[1], "",
          "| rule | strength | on-concept | success | fluency gap | latents |", "|---|---|---|---|---|---|"]
    for rule in ("smd", "cosine", "lens"):
        for s in (0.3, 0.4):
            mine = [r for r in rows if r["rule"] == rule and r["strength"] == s]
            md.append(f"| {rule} | {s} | {sum(r['concept'] for r in mine) / len(mine):.2f} | "
                      f"{sum(r['success'] for r in mine) / len(mine):.2f} | "
                      f"{sum(r['fluency_gap'] for r in mine) / len(mine):+.2f} | "
                      + ", ".join(f"{r['target']}:{r['feature']}" for r in mine) + " |")
    (RESULTS / "latent_choice_pilot.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
