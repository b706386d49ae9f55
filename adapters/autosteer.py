"""Auto-steer: from example texts of a concept to steering edits that were measured to work.

    result = auto_steer(lm, splice, sae, positive, negative, prompts=AUTOSTEER_PROMPTS)
    result.edits, result.measured        # what to store as a preset, and how it scored

Steps, each bounded:
1. Read the positive and negative texts at the SAE's hook (adapters/steering.py).
2. Candidates: the `n_latents` best concept latents by concept search (standardised mean difference, dense
   latents excluded), each as an `add` on all positions, and the DiffMean vector. Strengths in `norm` units (a
   fraction of the median residual norm at the hook), the grid chosen on the development concepts of
   bench/steering.py (docs/steering.md).
3. Judge: a bag-of-words classifier fitted on the sentences of the positive texts against those of the negatives
   (adapters/judge.py): nothing here reads the benchmark's judge or its texts.
4. Generate from the prompts under every candidate and strength, score on-concept, fluency gap (CE under the
   unsteered model against its CE on the positive texts) and distinct-2 (adapters/steer_score.py), and keep the
   setting with the most successes (on-concept, gap <= max_fluency_gap, distinct-2 >= 0.6), ties to the smaller
   gap. When no setting succeeds at all, the most on-concept setting within the gap is kept, else the weakest.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .edits import Edit, LatentEdit, VectorEdit
from .judge import Judge
from .saes import LoadedSAE
from .splice_hooks import Splice
from .steer_score import MAX_GAP, continuation_ce, generate, reference_ce, score
from .steering import concept_latents, decoder_norms, diffmean, median_norm, read_texts
from .units import SteerScales, to_raw

log = logging.getLogger(__name__)

#: Prompts auto-steer tunes on: neutral, and none of them is an evaluation prompt of bench/steering.py.
AUTOSTEER_PROMPTS = ("Once upon a time,", "I want to tell you about", "The other day", "What I like most is",
                     "Here is a short story:", "Last week we")
#: Strengths in `norm` units: on the development concepts the best lay at 0.3-0.5 for latents and DiffMean alike
#: (bench/results/steering_pilot.md).
STRENGTHS = (0.3, 0.4, 0.5)
MAX_TEXTS = 64  # texts read per side
MAX_LEN = 64  # tokens read per text


def casual_texts_path() -> Path:
    """saelora/data/concepts/casual.json: short everyday texts per concept, and texts of no concept ("none")."""
    import saelora

    return Path(saelora.__file__).parent / "data" / "concepts" / "casual.json"


def default_negatives() -> list[str]:
    """Auto-steer's negatives when a request gives none: the shipped everyday texts of no concept."""
    return list(json.loads(casual_texts_path().read_text(encoding="utf-8"))["none"])


def sentences(texts: Sequence[str], min_words: int = 5) -> list[str]:
    """Texts cut into sentences of at least `min_words` words (the judge's unit: generations are that short)."""
    out = []
    for t in texts:
        out += [s for s in re.split(r"(?<=[.!?])\s+", t) if len(s.split()) >= min_words]
    return out or [t for t in texts if t.strip()]


@dataclass
class Candidate:
    method: str  # latent_add | diffmean
    strength: float  # in norm units
    edits: list[Edit]
    summary: dict[str, float] = field(default_factory=dict)


@dataclass
class AutoSteerResult:
    edits: list[Edit]
    measured: dict[str, Any]  # the winner's concept, fluency_gap, distinct2, success, method, strength
    candidates: list[Candidate]
    seconds: float


def _candidates(sae: LoadedSAE, pos: Any, neg: Any, sc: SteerScales, n_latents: int,
                strengths: Sequence[float]) -> list[Candidate]:
    out = []
    for r in concept_latents(pos, neg, n=n_latents):
        for s in strengths:
            out.append(Candidate("latent_add", s, [LatentEdit(sae.name, r.feature, "add",
                                                              round(to_raw(s, "norm", sc, feature=r.feature), 4))]))
    v = [round(x, 5) for x in diffmean(pos, neg).tolist()]
    for s in strengths:
        out.append(Candidate("diffmean", s, [VectorEdit(sae.name, tuple(v), "add",
                                                        round(to_raw(s, "norm", sc, vector=v), 6))]))
    return out


def _pick(cands: list[Candidate]) -> Candidate:
    ok = [c for c in cands if c.summary["success"] > 0]
    if ok:
        return max(ok, key=lambda c: (c.summary["success"], -c.summary["fluency_gap"]))
    within = [c for c in cands if c.summary["fluency_gap"] <= MAX_GAP]
    if within:
        return max(within, key=lambda c: (c.summary["concept"], -c.summary["fluency_gap"]))
    return min(cands, key=lambda c: c.strength)


def auto_steer(lm: Any, splice: Splice, sae: LoadedSAE, positive: Sequence[str], negative: Sequence[str],
               prompts: Sequence[str] | None = None, max_fluency_gap: float = MAX_GAP, samples: int = 2,
               max_new: int = 24, n_latents: int = 2, strengths: Sequence[float] = STRENGTHS, seed: int = 0,
               temperature: float = 0.7) -> AutoSteerResult:
    """Search, sweep and judge (module docstring). `splice` holds `sae` and is installed on `lm.model`; it is
    removed while the unsteered model scores, and installed again."""
    t0 = time.perf_counter()
    prompts = list(prompts or AUTOSTEER_PROMPTS)
    positive, negative = list(positive)[:MAX_TEXTS], list(negative)[:MAX_TEXTS]
    judge = Judge.fit({"concept": sentences(positive)}, negatives=sentences(negative))
    pos = read_texts(lm.model, lm.tokenizer, sae, positive, max_len=MAX_LEN)
    neg = read_texts(lm.model, lm.tokenizer, sae, negative, max_len=MAX_LEN)
    sc = SteerScales([], decoder_norms(sae), median_norm(neg))
    bos = lm.tokenizer.bos_token_id if sae.policy.prepend_bos else None
    splice.remove()
    try:
        ref = reference_ce(lm.model, lm.tokenizer, positive, bos=bos)
    finally:
        splice.install()
    cands = _candidates(sae, pos, neg, sc, n_latents, strengths)
    for c in cands:
        gens = generate(lm, splice, prompts, c.edits, samples=samples, max_new=max_new, temperature=temperature,
                        seed=seed)
        splice.remove()
        try:
            ce = continuation_ce(lm.model, gens)
        finally:
            splice.install()
        c.summary = score(gens, ce, judge, "concept", ref, max_gap=max_fluency_gap).summary()
    best = _pick(cands)
    measured = {**{k: round(v, 4) for k, v in best.summary.items()}, "method": best.method,
                "strength": best.strength, "unit": "norm", "reference_ce": round(ref, 4)}
    seconds = time.perf_counter() - t0
    log.info("auto-steer: %s at %.2f (norm): %s in %.1f s", best.method, best.strength, measured, seconds)
    return AutoSteerResult(best.edits, measured, cands, seconds)
