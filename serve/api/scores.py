"""Log-probabilities on the wire: the completion's, and the prompt's when a request echoes it or asks vLLM's
`prompt_logprobs` (what lm-eval-harness's `local-completions` scores loglikelihood tasks with).

A request's prompt scores come from the engine as one `PromptLogprobs` event (serve/core/engine.py) before any
token: each prompt token's logprob under the request's model, adapter and splice (None for the first token).
`Reply` is what the request asked to see of them; these functions turn them and the generated tokens into the
OpenAI legacy-completions shapes (`text_offset` counts characters of the token strings, prompt first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from saelora.clients import protocol as P

from ..core.engine import TokenEvent, TokenScore


@dataclass(frozen=True)
class Reply:
    """What a request asked to see in its reply beyond the completion: its prompt's text before the completion
    (`text`, None: no echo), the prompt tokens' logprobs in `logprobs` (echo with logprobs), vLLM's
    `prompt_logprobs`, and the latents' form (`compact`: saelora.clients.compact)."""

    ids: list[int]
    text: str | None = None
    logprobs: bool = False
    prompt_logprobs: bool = False
    compact: bool = False

    @classmethod
    def of(cls, r: P.CompletionRequest | P.ChatCompletionRequest, ids: list[int], tok: Any,
           sae: P.SAEOptions | None) -> "Reply":
        compact = bool(sae and sae.features and sae.features.format == "compact")
        if not isinstance(r, P.CompletionRequest):
            return cls(ids, compact=compact)
        p = r.prompt_text_or_ids()
        text = (p if isinstance(p, str) else tok.decode(ids)) if r.echo else None
        return cls(ids, text, r.echo and r.logprobs is not None, r.prompt_logprobs is not None, compact)


def completion_logprobs(tok: Any, tokens: Sequence[TokenEvent], echo: Reply | None = None,
                        scores: Sequence[TokenScore | None] | None = None, offset: int | None = 0
                        ) -> P.CompletionLogprobs:
    """The prompt's entries first when echoed (`scores`: its PromptLogprobs), then the generated tokens'.
    `offset`: the first entry's text offset (None: none, a streamed chunk's, which does not know it)."""
    rows: list[tuple[int, float | None, list[tuple[int, float]] | None]] = []
    if echo is not None and echo.logprobs and scores is not None:
        rows += [(t, None, None) if s is None else (t, s[0], s[2]) for t, s in zip(echo.ids, scores, strict=True)]
    rows += [(t.token_id, t.logprob if t.logprob is not None else 0.0, t.top_logprobs or []) for t in tokens]
    out = P.CompletionLogprobs()
    for token_id, logprob, top in rows:
        s = tok.decode([token_id])
        out.tokens.append(s)
        out.token_logprobs.append(logprob)
        out.top_logprobs.append(None if top is None else {tok.decode([i]): v for i, v in top})
        if offset is not None:
            out.text_offset.append(offset)
            offset += len(s)
    return out


def prompt_logprobs(tok: Any, ids: Sequence[int], scores: Sequence[TokenScore | None]
                    ) -> list[dict[str, P.PromptLogprob] | None]:
    """vLLM's `prompt_logprobs`: per position, token id -> entry, for the prompt's token and the top k."""
    out: list[dict[str, P.PromptLogprob] | None] = []
    for token_id, s in zip(ids, scores, strict=True):
        if s is None:
            out.append(None)
            continue
        logprob, rank, top = s
        entry = {str(i): P.PromptLogprob(logprob=v, rank=r + 1, decoded_token=tok.decode([i]))
                 for r, (i, v) in enumerate(top)}
        entry[str(token_id)] = P.PromptLogprob(logprob=logprob, rank=rank, decoded_token=tok.decode([token_id]))
        out.append(entry)
    return out
