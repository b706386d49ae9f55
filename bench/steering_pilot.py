"""The steering pilot (recorded; not rerun by CI): latent `add` on all vs generated positions, DiffMean and the
paper's projection scaling over a fine strength grid on the development concepts, SmolLM2 with its shipped SAE,
base condition, 12 neutral prompts x 2 samples. It chose bench/steering.py's grids, auto-steer's strengths
(0.3-0.5 norm) and candidates, and the default positions (all).

    python bench/steering_pilot.py      # ~15 min; writes bench/results/steering_pilot.json
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from saelora.adapters.autosteer import sentences
from saelora.adapters.edits import LatentEdit, VectorEdit
from saelora.adapters.judge import Judge
from saelora.adapters.models import load_model
from saelora.adapters.saes import load_sae, shipped_sae
from saelora.adapters.splice_hooks import Splice
from saelora.adapters.steer_score import continuation_ce, generate, reference_ce, score
from saelora.adapters.steering import (concept_latents, decoder_norms, diffmean, median_norm, project_direction,
                                       read_texts)
from saelora.adapters.units import SteerScales, to_raw
from saelora.trainer.concepts import DEV_CONCEPTS, wiki_suite

OUT = Path(__file__).parent / "results" / "steering_pilot.json"


def main() -> None:
    torch.set_num_threads(2)
    suite = wiki_suite()
    judge = Judge.fit({c: sentences(suite.texts(c, "judge")) for c in suite.concepts},
                      sentences(suite.part(suite.negatives, "judge")))
    lm = load_model("smollm2-135m")
    sae = load_sae(lm.model, str(shipped_sae("smollm2-135m")), tokenizer=lm.tokenizer)
    sp = Splice(lm.model, [sae], mode="error_term").install()
    out: list[dict] = []

    def rec(concept: str, ref: float, name: str, strength: float, edits: list) -> None:
        gens = generate(lm, sp, suite.prompts, edits, samples=2, max_new=32, temperature=0.7, seed=0)
        sp.remove()
        ce = continuation_ce(lm.model, gens)
        sp.install()
        s = score(gens, ce, judge, concept, ref).summary()
        out.append({"concept_name": concept, "method": name, "strength": strength,
                    **{k: round(x, 3) for k, x in s.items()}, "example": gens[0].text[:120]})
        print(json.dumps(out[-1]), flush=True)

    for c in DEV_CONCEPTS:
        sp.remove()
        ref = reference_ce(lm.model, lm.tokenizer, suite.texts(c, "test", 48))
        sp.install()
        pos = read_texts(lm.model, lm.tokenizer, sae, suite.texts(c, "search", 48), max_len=64)
        neg = read_texts(lm.model, lm.tokenizer, sae, suite.others(c, "search", 96), max_len=64)
        v, sc = diffmean(pos, neg).tolist(), SteerScales([1.0] * sae.d_sae, decoder_norms(sae), median_norm(neg))
        tops = {r: [x.feature for x in concept_latents(pos, neg, r, n=3)] for r in ("smd", "freq", "mean_diff")}
        print(c, tops, flush=True)
        f = tops["smd"][0]
        for st in (0.3, 0.4, 0.5, 0.6, 0.7):
            value = to_raw(st, "norm", sc, feature=f)
            rec(c, ref, "latent_add_all", st, [LatentEdit(sae.name, f, "add", value)])
            rec(c, ref, "latent_add_generated", st, [LatentEdit(sae.name, f, "add", value, positions="generated")])
            rec(c, ref, "diffmean_all", st, [VectorEdit(sae.name, tuple(v), "add", to_raw(st, "norm", sc, vector=v))])
        for a in (2.0, 5.0, 10.0, 20.0):
            rec(c, ref, "project", a, [VectorEdit(sae.name, project_direction(sae, f), "project", a)])
        for r in ("freq", "mean_diff"):  # only where another ranking picks another best latent
            if tops[r][0] != f:
                for st in (0.4, 0.5, 0.6):
                    g = tops[r][0]
                    rec(c, ref, f"latent_add_all_{r}", st, [LatentEdit(sae.name, g, "add",
                                                                       to_raw(st, "norm", sc, feature=g))])
    OUT.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
