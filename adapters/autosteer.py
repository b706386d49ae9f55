"""Auto-steer: from example texts of a concept to steering edits that were measured to work.

    result = auto_steer(lm, splice, sae, positive, negative, prompts=AUTOSTEER_PROMPTS)
    result.edits, result.measured        # what to store as a preset, and how it scored

Steps, each bounded:
1. Read the positive and negative texts at the SAE's hook (adapters/steering.py).
2. Candidates: the `n_latents` best concept latents by concept search (standardised mean difference, dense
   latents excluded), each as an `add` on all positions, and the DiffMean vector. Strengths are fractions of the
   residual's spread about its mean (`steering.spread`: it transfers between models where the raw norm does not),
   the grid chosen on the development concepts of both models (bench/results/autosteer_pilot.md); the preset
   states them in `norm` units.
3. Judge: a bag-of-words classifier fitted on the sentences of the positive texts against those of the negatives
   (adapters/judge.py): nothing here reads the benchmark's judge or its texts.
4. Generate from the prompts under every candidate and strength (one batch), score on-concept, fluency gap (CE
   under the unsteered model against its CE on the positive texts) and distinct-2 (adapters/steer_score.py), and
   keep the winner by the rule `PICK` (chosen on the development concepts: bench/results/autosteer_pilot.md).
5. Measure the winner again with a fresh seed: the sweep's best score is biased upward (winner's curse), so the
   reported `measured` is this second, unselected run.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .edits import Edit, LatentEdit, VectorEdit
from .judge import Judge
from .saes import LoadedSAE
from .splice_hooks import Splice
from .steer_score import MAX_GAP, MIN_DISTINCT, reference_ce, score_each
from .steering import concept_latents, decoder_norms, diffmean, median_norm, read_texts, spread
from .units import SteerScales, to_raw

log = logging.getLogger(__name__)

#: Prompts auto-steer tunes on: neutral, and none of them is an evaluation prompt of bench/steering.py.
AUTOSTEER_PROMPTS = ("Once upon a time,", "I want to tell you about", "The other day", "What I like most is",
                     "Here is a short story:", "Last week we")
#: Strengths as fractions of the residual's spread about its mean (`steering.spread`), the scale that transfers
#: between models: on SmolLM2's development concepts the best lay at 0.3-0.5 of the median norm for latents and
#: DiffMean alike (bench/results/steering_pilot.md), which is 0.42-0.70 of the spread there (the spread is 0.72
#: of the median norm on SmolLM2, 0.23 on Gemma 3). The 0.3 point was added for Gemma 3, whose fluency gap
#: climbs fast: every development pick of the 0.4-0.7 grid sat at 0.4 (v3 pilot, bench/results/autosteer_pilot.md).
STRENGTHS = (0.3, 0.4, 0.55, 0.7)
#: Concept latents swept beside DiffMean: on both models' development concepts `method_mean` never picked the
#: second latent (v3 pilot), and one fewer method pays for the fourth strength.
N_LATENTS = 1
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
    strength: float  # in norm units (what an edit of the preset would say)
    edits: list[Edit]
    summary: dict[str, float] = field(default_factory=dict)
    feature: int | None = None  # the latent of a latent_add candidate


@dataclass
class AutoSteerResult:
    edits: list[Edit]
    measured: dict[str, Any]  # the winner's concept, fluency_gap, distinct2, success, method, strength
    candidates: list[Candidate]
    seconds: float


def _candidates(sae: LoadedSAE, pos: Any, neg: Any, sc: SteerScales, n_latents: int,
                strengths: Sequence[float]) -> list[Candidate]:
    """Each strength (a fraction of the spread) is expressed in norm units, then made raw."""
    per_spread = spread(neg) / sc.resid_norm
    norms = [round(s * per_spread, 4) for s in strengths]
    out = []
    for r in concept_latents(pos, neg, n=n_latents):
        for s in norms:
            out.append(Candidate("latent_add", s, [LatentEdit(sae.name, r.feature, "add",
                                                              round(to_raw(s, "norm", sc, feature=r.feature), 4))],
                                 feature=r.feature))
    v = [round(x, 5) for x in diffmean(pos, neg).tolist()]
    for s in norms:
        out.append(Candidate("diffmean", s, [VectorEdit(sae.name, tuple(v), "add",
                                                        round(to_raw(s, "norm", sc, vector=v), 6))]))
    return out


def _fallback(cands: list[Candidate], max_gap: float) -> Candidate:
    """No setting meets the bounds: the most on-concept one within the gap, else the weakest."""
    within = [c for c in cands if c.summary["fluency_gap"] <= max_gap]
    if within:
        return max(within, key=lambda c: (c.summary["concept"], -c.summary["fluency_gap"]))
    return min(cands, key=lambda c: c.strength)


def _by_success(cands: list[Candidate], max_gap: float, strong: bool = False) -> Candidate:
    ok = [c for c in cands if c.summary["success"] > 0]
    tie = (lambda c: c.strength) if strong else (lambda c: -c.summary["fluency_gap"])
    return max(ok, key=lambda c: (c.summary["success"], tie(c))) if ok else _fallback(cands, max_gap)


def _within(cands: list[Candidate], max_gap: float, margin: float) -> list[Candidate]:
    """The settings whose mean gap is at most `max_gap - margin` and whose mean distinct-2 is within its bound."""
    return [c for c in cands if c.summary["fluency_gap"] <= max_gap - margin and c.summary["distinct2"] >= MIN_DISTINCT]


def _by_concept(cands: list[Candidate], max_gap: float, margin: float = 0.0) -> Candidate:
    ok = _within(cands, max_gap, margin)
    return max(ok, key=lambda c: (c.summary["concept"], c.summary["success"])) if ok else _fallback(cands, max_gap)


def _by_method(cands: list[Candidate], max_gap: float, margin: float = 0.2) -> Candidate:
    """The method (a latent, or DiffMean) most on-concept over all its strengths (a mean over 3x the
    generations: less noisy than one setting), then its strongest setting whose mean gap is within the bound
    less `margin` and whose distinct-2 is within its bound."""
    methods: dict[tuple[str, int | None], list[Candidate]] = {}
    for c in cands:
        methods.setdefault((c.method, c.feature), []).append(c)
    best = max(methods.values(), key=lambda cs: sum(c.summary["concept"] for c in cs) / len(cs))
    ok = _within(best, max_gap, margin)
    return max(ok, key=lambda c: c.strength) if ok else _fallback(cands, max_gap)


#: How the winner is chosen from the sweep (compared on the development concepts: bench/autosteer_pilot.py):
#: the most successes (ties: smaller gap, or the stronger setting), or the most on-concept generations among the
#: settings whose mean gap and distinct-2 are within the bounds (optionally with a safety margin on the gap).
PICKS: dict[str, Callable[[list[Candidate], float], Candidate]] = {
    "success": _by_success,
    "success_strong": lambda c, g: _by_success(c, g, strong=True),
    "concept": _by_concept,
    "concept_margin": lambda c, g: _by_concept(c, g, margin=0.25),
    "method_mean": _by_method,
}
PICK = "method_mean"


def _scores(lm: Any, splice: Splice, prompts: list[str], settings: list[list[Edit]], judge: Judge, ref: float,
            max_gap: float, **run: Any) -> list[dict[str, float]]:
    """Each setting's summary: generated in one batch, scored by `judge` against the reference CE."""
    return [s.summary() for _, s in score_each(lm, splice, prompts, settings, judge, "concept", ref, max_gap,
                                               **run)]


def auto_steer(lm: Any, splice: Splice, sae: LoadedSAE, positive: Sequence[str], negative: Sequence[str],
               prompts: Sequence[str] | None = None, max_fluency_gap: float = MAX_GAP, samples: int = 2,
               max_new: int = 24, n_latents: int = N_LATENTS, strengths: Sequence[float] = STRENGTHS, seed: int = 0,
               temperature: float = 0.7, pick: str = PICK) -> AutoSteerResult:
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
    t_read = time.perf_counter() - t0
    run = dict(samples=samples, max_new=max_new, temperature=temperature)
    for c, summary in zip(cands, _scores(lm, splice, prompts, [c.edits for c in cands], judge, ref, max_fluency_gap,
                                         seed=seed, **run), strict=True):
        c.summary = summary
    best = PICKS[pick](cands, max_fluency_gap)
    t_sweep = time.perf_counter() - t0 - t_read
    # the winner's sweep score is biased upward (the best of several noisy estimates): measure it again, afresh
    again = _scores(lm, splice, prompts, [best.edits], judge, ref, max_fluency_gap, seed=seed + 1, **run)[0]
    measured = {**{k: round(v, 4) for k, v in again.items()}, "method": best.method, "strength": best.strength,
                "unit": "norm", "reference_ce": round(ref, 4), "sweep_concept": round(best.summary["concept"], 4)}
    seconds = time.perf_counter() - t0
    log.info("auto-steer: %s at %.2f (norm): %s in %.1f s (reading and judge %.1f s, sweep %.1f s, measuring "
             "again %.1f s)", best.method, best.strength, measured, seconds, t_read, t_sweep,
             seconds - t_read - t_sweep)
    return AutoSteerResult(best.edits, measured, cands, seconds)
