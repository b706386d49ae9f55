"""The steering pilot (recorded, not rerun by CI): latent add at all vs generated positions, DiffMean and
projection scaling over a fine grid on the development concepts, SmolLM2 with its shipped SAE, base condition.
It chose bench/steering.py's grids, auto-steer's strengths (0.3-0.5 norm) and the default positions (all).
Results: bench/results/steering_pilot.{json,md}. Run: python bench/steering_pilot.py (~15 min)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from steering_pilot_common import *  # noqa: E402,F403
from saelora.trainer.concepts import DEV_CONCEPTS
prompts = list(suite.prompts)
dn = decoder_norms(sae)
out = []
for c in DEV_CONCEPTS:
    ref = reference(c)
    pos = read_texts(lm.model, lm.tokenizer, sae, suite.texts(c,"search",48), max_len=64)
    neg = read_texts(lm.model, lm.tokenizer, sae, suite.others(c,"search",96), max_len=64)
    norm = median_norm(neg); v = diffmean(pos, neg)
    sc = SteerScales([1.0]*sae.d_sae, dn, norm)
    tops = {r: [x.feature for x in concept_latents(pos, neg, r, n=3)] for r in ("smd","freq","mean_diff")}
    print(c, tops, flush=True)
    f = tops["smd"][0]
    def rec(name, st, edits):
        gens, s = run(c, edits, prompts, samples=2, ref=ref)
        d = {"concept_name": c, "method": name, "strength": st, **{k: round(x,3) for k,x in s.summary().items()}, "example": gens[0].text[:120]}
        out.append(d); print("  ", json.dumps(d), flush=True)
    for st in (0.3, 0.4, 0.5, 0.6, 0.7):
        rec("latent_add_all", st, [LatentEdit(sae.name, f, "add", to_raw(st, "norm", sc, feature=f))])
        rec("latent_add_generated", st, [LatentEdit(sae.name, f, "add", to_raw(st, "norm", sc, feature=f), positions="generated")])
        rec("diffmean_all", st, [VectorEdit(sae.name, tuple(v.tolist()), "add", to_raw(st, "norm", sc, vector=v.tolist()))])
    d = project_direction(sae, f)
    for a in (2.0, 5.0, 10.0, 20.0):
        rec("project", a, [VectorEdit(sae.name, d, "project", a)])
    for r in ("freq", "mean_diff"):
        if tops[r][0] != f:
            g = tops[r][0]
            for st in (0.4, 0.5, 0.6):
                rec(f"latent_add_all_{r}", st, [LatentEdit(sae.name, g, "add", to_raw(st, "norm", sc, feature=g))])
json.dump(out, open(Path(__file__).parent / 'results' / 'steering_pilot.json', 'w'), indent=1)
