"""`saelora steer-eval`: does steering work? Per concept and method, sweep the strength and measure how many
generations from neutral prompts are on-concept, fluent and not repetitive (adapters/steer_score.py).

Methods (`METHODS`):
    none         no edit (the base rate of the judge on unsteered text)
    prompt       "The following text is about <description>." before the prompt (the reference)
    latent_add   the best latent of concept search, `add` (norm units) on all positions
    latent_set   the same latent, `set` to a multiple of its max activation (max units) on all positions
    diffmean     the difference-of-means vector of the concept's texts against the others, `add` (norm units)
    project      the paper's projection scaling along the latent's decoder direction, x += a (x.d^) d^
    auto         auto-steer (adapters/autosteer.py) on the concept's search texts: it tunes on its own prompts and
                 its own judge, and is scored here like every other method

The judge is fitted once on the sentences of every concept's `judge` texts against the negatives' (never on the
`search` texts that concept search, DiffMean and auto-steer read); its recall and false-positive rate on the
`test` texts are reported. Conditions: `base` (error_term, no adapter); with `--adapter`, also `spliced` (replace,
no adapter) and `adapted` (replace, with the adapter): the paper's claim that the adapter makes the spliced model
steer more cleanly along SAE latents.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from saelora.adapters.autosteer import auto_steer, sentences
from saelora.adapters.config import DEFAULT_MODEL
from saelora.adapters.edits import LatentEdit, VectorEdit
from saelora.adapters.judge import Judge
from saelora.adapters.steer_score import Scores, reference_ce, score_each
from saelora.adapters.steering import (concept_latents, decoder_norms, diffmean, median_norm, project_direction,
                                       read_texts)
from saelora.adapters.units import SteerScales, to_raw

from .concepts import ConceptSuite
from .config import opt

log = logging.getLogger(__name__)

METHODS = ("none", "prompt", "latent_add", "latent_set", "diffmean", "project", "auto")
#: Strength grids per method (units: norm for latent_add and diffmean, max for latent_set, raw for project);
#: bracketing the optimum found on the development concepts (bench/results/steering_pilot.md).
GRIDS: dict[str, tuple[float, ...]] = {"latent_add": (0.2, 0.3, 0.4, 0.5, 0.6, 0.8),
                                       "diffmean": (0.2, 0.3, 0.4, 0.5, 0.6, 0.8),
                                       "latent_set": (1.0, 2.0, 4.0), "project": (2.0, 5.0, 10.0)}


@dataclass
class SteerEvalConfig:
    model: str = opt(DEFAULT_MODEL, "base model spec")
    sae: str | None = opt(None, "sae-lens folder (default: the demo's SAE in $SAELORA_CACHE/demo/<model>/sae)")
    adapter: str | None = opt(None, "adapter bundle: adds the spliced and adapted conditions")
    suite: str = opt("wiki", "concept suite: 'wiki' (embedded) or a folder (trainer/concepts.py)")
    concepts: list[str] = opt(factory=list, help="concepts to run (default: all of the suite)")
    methods: list[str] = opt(factory=lambda: list(METHODS), help=f"methods, of {METHODS}")
    adapter_methods: list[str] = opt(factory=lambda: ["none", "latent_add", "project"],
                                     help="methods also run in the spliced and adapted conditions (with --adapter)")
    samples: int = opt(2, "generations per prompt and setting")
    grid_scale: float = opt(1.0, "multiply the norm-unit grids (latent_add, diffmean): they bracket SmolLM2's "
                            "optimum; for another model use its spread-to-norm ratio over SmolLM2's "
                            "(adapters/steering.py spread; Gemma 3: 0.32)")
    norm_grid: list[float] = opt(factory=list, help="strengths (norm units) for latent_add and diffmean instead of "
                                 "their grids (a run on test concepts at strengths chosen elsewhere)")
    max_new: int = opt(32, "tokens generated")
    temperature: float = opt(0.7, "sampling temperature (0: greedy)")
    seed: int = opt(0, "sampling seed")
    search_texts: int = opt(48, "concept texts read by search, DiffMean and auto-steer (negatives: twice as many)")
    max_len: int = opt(64, "tokens read per search text")
    out: str | None = opt(None, "write results.json here (a folder)")
    device: str | None = opt(None, "default: cuda if available, else cpu")


@dataclass
class Plan:
    """What one concept's settings are built from."""

    concept: str
    latents: list[dict[str, Any]]  # concept search's best, with their statistics
    feature: int  # the best
    direction: tuple[float, ...]  # its decoder row (projection scaling)
    vector: tuple[float, ...]  # DiffMean
    scales: SteerScales
    reference: float  # CE of the unsteered model on the concept's test texts


def fit_judge(suite: ConceptSuite) -> tuple[Judge, dict[str, Any]]:
    """The benchmark's judge, and its accuracy on the test texts (the first 25 words of each: a generation's
    length)."""
    judge = Judge.fit({c: sentences(suite.texts(c, "judge")) for c in suite.concepts},
                      sentences(suite.part(suite.negatives, "judge")))
    cut = {c: [" ".join(t.split()[:25]) for t in suite.texts(c, "test")] for c in suite.concepts}
    return judge, judge.accuracy(cut, [" ".join(t.split()[:25]) for t in suite.part(suite.negatives, "test")])


def plan(lm: Any, sae: Any, suite: ConceptSuite, concept: str, max_act: list[float], cfg: SteerEvalConfig) -> Plan:
    """Concept search, DiffMean and scales from the concept's search texts, and the reference CE, all read with
    `lm.model` as it is called (the caller makes it the unsteered model)."""
    pos = read_texts(lm.model, lm.tokenizer, sae, suite.texts(concept, "search", cfg.search_texts), cfg.max_len)
    neg = read_texts(lm.model, lm.tokenizer, sae, suite.others(concept, "search", 2 * cfg.search_texts), cfg.max_len)
    ranked = concept_latents(pos, neg, n=5)
    bos = lm.tokenizer.bos_token_id if sae.policy.prepend_bos else None
    ref = reference_ce(lm.model, lm.tokenizer, suite.texts(concept, "test", 48), bos=bos)
    f = ranked[0].feature
    return Plan(concept, [asdict(r) for r in ranked], f, project_direction(sae, f), tuple(diffmean(pos, neg).tolist()),
                SteerScales(max_act, decoder_norms(sae), median_norm(neg)), ref)


def settings(p: Plan, method: str, sae_name: str, grid_scale: float = 1.0,
             norm_grid: list[float] | None = None) -> list[tuple[float, list[Any]]]:
    """(strength, edits) of one method's grid for one concept (norm-unit grids, or `norm_grid`, times
    `grid_scale`)."""
    f, sc = p.feature, p.scales
    norms = [round(s * grid_scale, 4) for s in (norm_grid or GRIDS.get(method, ()))]
    if method == "latent_add":
        return [(s, [LatentEdit(sae_name, f, "add", to_raw(s, "norm", sc, feature=f))]) for s in norms]
    if method == "latent_set":
        return [(s, [LatentEdit(sae_name, f, "set", to_raw(s, "max", sc, feature=f))]) for s in GRIDS[method]]
    if method == "diffmean":
        return [(s, [VectorEdit(sae_name, p.vector, "add", to_raw(s, "norm", sc, vector=p.vector))]) for s in norms]
    if method == "project":
        return [(s, [VectorEdit(sae_name, p.direction, "project", s)]) for s in GRIDS[method]]
    return [(0.0, [])]


@dataclass
class Runner:
    """Generates and scores settings under one condition: `mode` for the SAE, and `base` a context in which
    `lm.model` is the unsteered model (the adapter off) that fluency is measured with."""

    lm: Any
    splice: Any
    judge: Judge
    cfg: SteerEvalConfig
    mode: str
    base: Any

    def run(self, p: Plan, edits: list[Any], prompts: list[str], prefix: str = "") -> dict[str, Any]:
        return self.run_each(p, [edits], prompts, prefix)[0]

    def run_each(self, p: Plan, settings: list[list[Any]], prompts: list[str],
                 prefix: str = "") -> list[dict[str, Any]]:
        """Each setting (an edit list) scored; their generations share one batch."""
        cfg = self.cfg
        return [self._summary(gens, s) for gens, s in score_each(
            self.lm, self.splice, prompts, settings, self.judge, p.concept, p.reference, unsteered=self.base,
            mode=self.mode, samples=cfg.samples, max_new=cfg.max_new, temperature=cfg.temperature, seed=cfg.seed,
            prefix=prefix)]

    @staticmethod
    def _summary(gens: list[Any], s: Scores) -> dict[str, Any]:
        return {**{k: round(v, 4) for k, v in s.summary().items()},
                "examples": [g.prompt + g.text for g in gens[:: max(1, len(gens) // 3)][:3]],
                "per_generation": {"concept": [round(x, 3) for x in s.concept], "gap": [round(x, 3) for x in s.gap],
                                   "distinct2": [round(x, 3) for x in s.distinct]}}


def concept_rows(runner: Runner, p: Plan, suite: ConceptSuite, sae: Any, methods: list[str],
                 condition: str) -> list[dict[str, Any]]:
    """Every setting of every method for one concept under one condition."""
    rows = []
    for method in methods:
        extra: dict[str, Any] = {}
        if method == "auto":  # tunes on its own prompts and judge, from the search texts alone
            n = runner.cfg.search_texts
            res = auto_steer(runner.lm, runner.splice, sae, suite.texts(p.concept, "search", n),
                             suite.others(p.concept, "search", 2 * n), seed=runner.cfg.seed + 1000)
            grid = [(res.measured["strength"], res.edits)]
            extra = {"auto": {**res.measured, "seconds": round(res.seconds, 1)}}
        else:
            grid = settings(p, method, sae.name, runner.cfg.grid_scale, runner.cfg.norm_grid)
        prefix = f"The following text is about {suite.descriptions[p.concept]}.\n\n" if method == "prompt" else ""
        results = runner.run_each(p, [edits for _, edits in grid], suite.prompts, prefix)
        for (strength, _), r in zip(grid, results, strict=True):
            rows.append({"condition": condition, "target": p.concept, "method": method, "strength": strength,
                         **extra, **r})  # "concept" is the on-concept fraction, "target" the concept's name
            log.info("%s %s %s %.2f: concept %.2f gap %.2f distinct %.2f success %.2f", condition, p.concept, method,
                     strength, r["concept"], r["fluency_gap"], r["distinct2"], r["success"])
    return rows
