"""Per-row sampling, logprobs, and incremental detokenisation with stop strings."""

from __future__ import annotations

from typing import Any

import torch

from .engine import Sampling, TokenScore


GREEDY_BELOW = 1e-5  # temperatures under this are greedy (as in vLLM): dividing by them overflows fp32


def sample(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> int:
    """One token from a row's logits (V,): greedy at temperature 0, else temperature / top-k / top-p."""
    if s.temperature < GREEDY_BELOW:
        return int(logits.argmax())
    scores = logits.float() / s.temperature
    if s.top_k and s.top_k > 0 and s.top_k < scores.numel():
        kth = scores.topk(s.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    probs = torch.softmax(scores, -1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < s.top_p
        keep[0] = True  # always the most likely token (a top_p below fp32's range rounds to 0 otherwise)
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=gen))


def logprobs_of(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The sampled token's logprob under the model (raw logits) and the top-k (token, logprob) pairs."""
    lp = torch.log_softmax(logits.float(), -1)
    top = lp.topk(k) if k > 0 else None
    pairs = [(int(i), float(v)) for v, i in zip(top.values, top.indices, strict=True)] if top is not None else []
    return float(lp[token]), pairs


def prompt_scores(logits: torch.Tensor, targets: torch.Tensor, k: int) -> list[TokenScore]:
    """Each target's logprob under the logits before it, and the top k there: logits (n, V) at positions
    0..n-1 of a row, targets (n,) the tokens at positions 1..n."""
    lp = torch.log_softmax(logits.float(), -1)
    got = lp.gather(1, targets[:, None])  # (n, 1)
    ranks = ((lp > got).sum(1) + 1).tolist()
    tops = [[]] * len(ranks)
    if k > 0:
        top = lp.topk(k, -1)
        tops = [list(zip(i, t, strict=True)) for i, t in zip(top.indices.tolist(), top.values.tolist(), strict=True)]
    return list(zip(got[:, 0].tolist(), ranks, tops, strict=True))


class Detokenizer:
    """Releases text as tokens arrive, holding back what could still become a stop string or a partial
    UTF-8 character; `finish` releases the rest (cut at the stop string).

    Incremental, as vLLM's detokenizer: each token decodes only the window ids[prefix:] against ids[prefix:read]
    (the tokens since the last text was produced, and the ones before them), so a generation costs linear, not
    quadratic, decoding. Decoding both from the same token keeps a tokenizer's leading-space handling out of the
    delta; a window whose text ends in U+FFFD (a partial UTF-8 character) waits for the next token."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.prefix = self.read = 0  # window: ids[prefix:read] is already in `text`
        self.released = 0
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _extend(self) -> None:
        before, now = self._decode(self.ids[self.prefix:self.read]), self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before):]
            self.prefix, self.read = self.read, len(self.ids)

    def add(self, token_id: int) -> tuple[str, bool]:
        """Add a token; returns (text delta, hit a stop string)."""
        self.ids.append(token_id)
        self._extend()
        for stop in self.stops:
            at = self.text.find(stop, max(0, self.released - len(stop)))
            if at != -1:
                self.text = self.text[:at]
                self.prefix = self.read = len(self.ids)  # nothing after a stop string is ever shown
                return "", True
        safe = len(self.text) - self.hold
        if safe <= self.released:
            return "", False
        delta, self.released = self.text[self.released:safe], safe
        return delta, False

    def truncate(self, n: int, released: int) -> None:
        """Keep the first n tokens, of which `released` characters were released (stop strings still cut)."""
        self.ids = self.ids[:n]
        text = self._decode(self.ids)
        cut = [at for stop in self.stops if (at := text.find(stop)) != -1]
        self.text, self.released = text[:min(cut)] if cut else text, released
        self.prefix = self.read = n

    def finish(self) -> str:
        if self.read < len(self.ids):  # tokens still held for a partial character: whatever they decode to
            self.text += self._decode(self.ids[self.prefix:])[len(self._decode(self.ids[self.prefix:self.read])):]
            self.prefix = self.read = len(self.ids)
        delta, self.released = self.text[self.released:], len(self.text)
        return delta
