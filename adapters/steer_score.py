"""Generate under a steering setting and score what comes out: on-concept (a judge), fluent (cross-entropy of the
generated tokens under the unsteered model, against what that model gives real texts of the concept) and not
repetitive (distinct-2). The steering benchmark (trainer/steer_eval.py) and auto-steer (serve/) both use it.

    gens = generate(lm, splice, prompts, edits, mode="error_term", samples=2, max_new=32, seed=0)
    ce = continuation_ce(lm.model, gens)                 # under the model as it is outside the splice context
    scores = score(gens, ce, judge, "mathematics", reference_ce)
    # a sweep: every setting generated in one batch, each scored the same way
    swept = score_each(lm, splice, prompts, [edits_a, edits_b], judge, "mathematics", reference_ce, samples=2)

A generation counts as a success when it is on-concept (judge probability >= 0.5), fluent (its CE is at most
`max_gap` nats above the reference) and distinct-2 >= `min_distinct`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .edits import SERVE_MODE, Edit
from .judge import Judge, words
from .splice import RowSpec, check_rows
from .splice_hooks import Splice

MAX_GAP = 0.5
MIN_DISTINCT = 0.6


@dataclass
class Generation:
    prompt: str  # the neutral prompt (fluency is measured after it)
    prompt_ids: list[int]  # its tokens, as the scoring model reads them
    ids: list[int]  # generated tokens, up to (not including) the first stop token
    text: str


@dataclass
class Scores:
    """Per generation and aggregated: judge probability, CE gap (nats above the reference), distinct-2."""

    concept: list[float]
    gap: list[float]
    distinct: list[float]
    max_gap: float = MAX_GAP
    min_distinct: float = MIN_DISTINCT

    def on(self) -> list[bool]:
        return [p >= 0.5 for p in self.concept]

    def success(self) -> list[bool]:
        return [o and g <= self.max_gap and d >= self.min_distinct
                for o, g, d in zip(self.on(), self.gap, self.distinct, strict=True)]

    def summary(self) -> dict[str, float]:
        n = max(1, len(self.concept))
        return {"concept": sum(self.on()) / n, "fluency_gap": sum(self.gap) / n, "distinct2": sum(self.distinct) / n,
                "success": sum(self.success()) / n, "n": len(self.concept)}


class CdfSampler(LogitsProcessor):
    """Samples each row's next token from softmax(scores / temperature), all of the vocabulary (no top-k or top-p),
    by inverting its cumulative distribution (float64 sums), and returns scores that are -inf except at the sampled
    token, for `generate(do_sample=False)` to take. The same distribution as HF's sampling, ~10x faster on a large
    vocabulary: `torch.multinomial` over Gemma 3's 262k tokens took 0.5 s per step at 96 rows on 2 cores, a
    quarter of auto-steer's time."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        cdf = torch.softmax(scores.float() / self.temperature, dim=-1).double().cumsum(-1)
        u = torch.rand(len(cdf), 1, dtype=torch.float64, device=cdf.device) * cdf[:, -1:]
        token = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


def _left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def generate(lm: Any, splice: Splice, prompts: Sequence[str], edits: Sequence[Edit], mode: str = SERVE_MODE,
             samples: int = 1, max_new: int = 32, temperature: float = 1.0, seed: int = 0,
             prefix: str = "", stop_ids: Sequence[int] = ()) -> list[Generation]:
    """`samples` generations per prompt (sampled at `temperature`; 0 = greedy), with `edits` under `mode` for every
    SAE of `splice`, and `prefix` put before each prompt (the prompting baseline). Fluency is measured after the
    neutral prompt alone, so `Generation.prompt_ids` leave the prefix out."""
    return generate_each(lm, splice, prompts, [edits], mode, samples, max_new, temperature, seed, prefix,
                         stop_ids)[0]


@torch.no_grad()
def generate_each(lm: Any, splice: Splice, prompts: Sequence[str], settings: Sequence[Sequence[Edit]],
                  mode: str = SERVE_MODE, samples: int = 1, max_new: int = 32, temperature: float = 1.0,
                  seed: int = 0, prefix: str = "", stop_ids: Sequence[int] = ()) -> list[list[Generation]]:
    """`generate` under each of several settings (edit lists) at once: one batch, each row with its own edits
    (the splice applies edits per row), so a sweep costs one generation loop instead of one per setting."""
    tok = lm.tokenizer
    neutral = [tok(p)["input_ids"] for p in prompts for _ in range(samples)]
    given = [tok(prefix + p)["input_ids"] for p in prompts for _ in range(samples)] if prefix else neutral
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, mask = _left_pad(given * len(settings), pad)
    device = next(lm.model.parameters()).device
    rows = [RowSpec(modes={n: mode for n in splice.saes}, edits=list(edits), prompt_len=len(g))
            for edits in settings for g in given]
    check_rows(splice.saes, rows)  # once: the batch context does not check
    torch.manual_seed(seed)
    # HF's greedy step over scores that CdfSampler has made -inf everywhere but the token it sampled
    sampler = [CdfSampler(temperature)] if temperature > 0 else []
    with splice.batch(rows=rows):
        out = lm.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new,
                                pad_token_id=pad, do_sample=False, logits_processor=LogitsProcessorList(sampler))
    stops = set(stop_ids) | {tok.eos_token_id}
    gens = []
    for r, row in enumerate(out[:, ids.shape[1]:].tolist()):
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        k = r % len(given)
        gens.append(Generation(prompts[k // samples], neutral[k], row[:cut], tok.decode(row[:cut])))
    return [gens[i:i + len(given)] for i in range(0, len(gens), len(given))]


@torch.no_grad()
def continuation_ce(model: torch.nn.Module, gens: Sequence[Generation], pad: int = 0,
                    batch_size: int = 16) -> list[float]:
    """Mean cross-entropy (nats per token) of each generation's tokens after its neutral prompt, under `model` as
    called (no splice context: the unsteered model). An empty generation gets +inf. Rows go `batch_size` at a
    time, left-padded so that every row's generated tokens end the batch: only the last positions' logits are
    computed (`logits_to_keep`), which matters with a large vocabulary (Gemma 3's LM head is most of its cost)."""
    if len(gens) > batch_size:
        return [ce for i in range(0, len(gens), batch_size)
                for ce in continuation_ce(model, gens[i:i + batch_size], pad, batch_size)]
    keep = max(len(g.ids) for g in gens) + 1  # the logits that predict the longest row's generated tokens
    if keep == 1:
        return [float("inf")] * len(gens)
    ids, mask = _left_pad([g.prompt_ids + g.ids for g in gens], pad)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                   logits_to_keep=keep).logits[:, :-1].float()  # (N, keep - 1): token t+1 given <= t
    target = ids[:, ids.shape[1] - keep + 1:].to(device)
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
    nll = nll.view(len(gens), keep - 1).cpu()
    return [float(nll[i, nll.shape[1] - len(g.ids):].mean()) if g.ids else float("inf") for i, g in enumerate(gens)]


@torch.no_grad()
def reference_ce(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], start: int = 4, length: int = 32,
                 bos: int | None = None) -> float:
    """Mean CE per token that `model` gives real texts over tokens [start, start + length): the band where a
    generation's tokens sit after a short prompt (the first tokens of any text are the hardest)."""
    rows = [([bos] if bos is not None else []) + tokenizer(t, add_special_tokens=False)["input_ids"][:start + length]
            for t in texts]
    if not any(len(r) > start + 1 for r in rows):  # short texts (a sentence each): score them from token 1
        start = 1
    rows = [r for r in rows if len(r) > start + 1]
    if not rows:
        raise ValueError("no text is long enough for a reference CE (each needs at least three tokens)")
    gens = [Generation("", r[:start], r[start:], "") for r in rows]
    ces = continuation_ce(model, gens)
    return sum(ces) / len(ces)


def distinct2(text: str) -> float:
    """Distinct word bigrams over all word bigrams of `text` (0 for fewer than two words)."""
    w = words(text)
    pairs = list(zip(w, w[1:], strict=False))
    return len(set(pairs)) / len(pairs) if pairs else 0.0


def score(gens: Sequence[Generation], ce: Sequence[float], judge: Judge, concept: str, reference: float,
          max_gap: float = MAX_GAP, min_distinct: float = MIN_DISTINCT) -> Scores:
    texts = [g.text for g in gens]
    return Scores(judge.prob(texts, concept), [c - reference for c in ce], [distinct2(t) for t in texts],
                  max_gap, min_distinct)


def score_each(lm: Any, splice: Splice, prompts: Sequence[str], settings: Sequence[Sequence[Edit]], judge: Judge,
               concept: str, reference: float, max_gap: float = MAX_GAP,
               unsteered: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
               **gen: Any) -> list[tuple[list[Generation], Scores]]:
    """Each setting's generations (`generate_each`, one batch; `gen` its options) and their scores. Fluency is
    measured with the splice removed and inside `unsteered()` (a context in which `lm.model` is the unsteered
    model, e.g. its adapter off); the splice is installed again afterwards."""
    swept = generate_each(lm, splice, prompts, settings, **gen)
    splice.remove()
    try:
        with unsteered():
            ces = [continuation_ce(lm.model, gens) for gens in swept]
    finally:
        splice.install()
    return [(gens, score(gens, ce, judge, concept, reference, max_gap=max_gap))
            for gens, ce in zip(swept, ces, strict=True)]
