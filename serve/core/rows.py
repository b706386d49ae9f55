"""The row core: what both engines keep for one request in flight, and every rule about a generated row they
share. An engine feeds a row four things and nothing else:

- `take(token, logprob, top)`: a token it sampled;
- `add_latents(sae, position, indices, values)` and `add_stop(position)`: what the splice read at a position
  (its top-k latents; a `stop_when` condition that held there);
- `read_through(position)`: every position up to this one has been through a forward, so its latents and stop
  conditions are all in;
- `add_prompt_scores(start, scores)`: prompt tokens' logprobs, from prompt position `start` on (when asked).

and calls `flush()` after each, which emits what is ready, in order: the prompt's logprobs and latents, then each
token's
event once its latents are in (the one-step lag: a token's latents are those at its own position, computed
when it is fed back), truncating at a `stop_when` hit, and finally `Finished`. The row owns the finish reasons
(EOS and stop strings "stop", `max_tokens` "length", a `stop_when` hit "stop"), the detokenizer, the adapter it
holds, and how a row fails. `context_limit` is the context-length rule.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Collection, Sequence

from .engine import (EngineError, Finished, GenerationRequest, Latents, PromptFeatures, PromptLogprobs, RowFailure,
                     TokenEvent, TokenFeaturesOut, TokenScore, report_bug)
from .sampling import Detokenizer


def context_limit(model_config: Any, asked: int | None, reserve: int = 0) -> int:
    """Prompt + max_tokens a server admits: `asked` (default: the model's positions), within the model's positions
    less `reserve` (tokens an engine asks for beyond max_tokens: the vLLM engine's one for the last latents)."""
    cfg_len = getattr(model_config, "max_position_embeddings", None) or 2048
    return min(asked or cfg_len, cfg_len - reserve)


class RowState:
    """One request in flight. Engines subclass it with their own bookkeeping (KV cache, vLLM request id)."""

    def __init__(self, req: GenerationRequest, emit: Callable[[Any], None], tokenizer: Any, eos: Collection[int],
                 sae_names: Sequence[str], prompt_only: bool = False) -> None:
        self.req, self.emit, self.eos = req, emit, eos
        self.prompt_len = len(req.prompt_ids)
        self.generated = 0  # tokens sampled, EOS included
        self.detok = Detokenizer(tokenizer, req.sampling.stop)
        sp = self.spec = req.splice  # what the splice applies to this row, as checked on admission
        if sp.prompt_len != self.prompt_len:
            raise ValueError("a row needs a checked request (serve/core/engine.py check_request)")
        self.report = list(sp.report or sae_names)  # SAEs whose latents this request gets
        self.top_k = sp.top_k
        self.waits = bool(sp.top_k or sp.stops)  # a token's event waits until its position has been read
        self.prompt_due = bool(sp.top_k and (sp.include_prompt or prompt_only))  # prompt latents still to send
        asked = req.sampling.prompt_logprobs is not None
        self.scores: list[TokenScore | None] | None = [None] * self.prompt_len if asked else None  # prompt logprobs
        self.scores_in = 1  # prompt positions scored so far (nothing predicts the first)
        self.pending: collections.deque[TokenEvent] = collections.deque()  # sampled, waiting to be read
        self.latents: dict[str, dict[int, tuple[list[int], list[float]]]] = {n: {} for n in self.report}
        self.stop_hits: set[int] = set()  # generated positions where a stop_when condition held
        self.read = -1  # every position up to this one has been through a forward
        self.emitted_chars = 0  # text carried by the token events emitted so far
        # finished (stop | length): pending events are flushed first. max_tokens 0 only scores the prompt, so a
        # token an engine samples anyway (vLLM samples at least one) is ignored
        self.reason: str | None = "length" if req.sampling.max_tokens < 1 else None
        self.eos_token: TokenEvent | None = None  # the EOS token that ended the row, if one did
        self.cancelled = False  # the client went away
        self.done = False
        self._registry: Any = None  # the adapter registry this row holds its adapter in, until `release`

    # ---- adapter ----------------------------------------------------------------------------------------
    def hold(self, registry: Any) -> None:
        """Count this row against its adapter (so it cannot be unloaded under it). Called once the row exists."""
        registry.acquire(self.req.adapter)
        self._registry = registry

    def end(self) -> None:
        """Mark the row done and give its adapter back (every way a row ends goes through here)."""
        self.done = True
        self.release()

    def release(self) -> None:
        """Give the adapter back; every way a row ends calls this, and only the first call counts."""
        registry, self._registry = self._registry, None
        if registry is not None:
            registry.release(self.req.adapter)

    def fail(self, error: Exception) -> None:
        """End the row with an error event (the engine has released what it held for it)."""
        self.end()
        if isinstance(error, EngineError):  # already what the client should see (e.g. 503: the engine stopped)
            self.emit(error)
            return
        if isinstance(error, RowFailure):
            self.emit(EngineError("internal", f"generation failed: {error}"))
            return
        rid = report_bug(error, "a row")
        self.emit(EngineError("internal", f"generation failed (request id {rid}; the server log has the details)"))

    # ---- what an engine feeds -----------------------------------------------------------------------------
    def take(self, tok: int, logprob: float | None = None, top: list[tuple[int, float]] | None = None) -> None:
        """A sampled token. Ignored once the row has a finish reason (a token asked for the last latents)."""
        if self.reason is not None:
            return
        self.generated += 1
        if tok in self.eos and not self.req.sampling.ignore_eos:
            self.reason = "stop"  # an end-of-sequence token is not shown, only listed in logprobs
            self.eos_token = TokenEvent(tok, self.prompt_len + self.generated - 1, "", logprob, top)
            return
        delta, hit_stop = self.detok.add(tok)
        self.pending.append(TokenEvent(tok, self.prompt_len + self.generated - 1, delta, logprob, top))
        if hit_stop or self.generated >= self.req.sampling.max_tokens:
            self.reason = "stop" if hit_stop else "length"

    def add_latents(self, sae: str, position: int, indices: Sequence[int], values: Sequence[float]) -> None:
        """The top-k latents SAE `sae` read at `position` (k at least this row's top_k)."""
        if sae in self.latents:
            self.latents[sae][position] = (list(indices[:self.top_k]), list(values[:self.top_k]))

    def add_stop(self, position: int) -> None:
        """A stop_when condition held at generated `position`."""
        self.stop_hits.add(position)

    def read_through(self, position: int) -> None:
        self.read = max(self.read, position)

    def add_prompt_scores(self, start: int, scores: Sequence[TokenScore | None]) -> None:
        """Prompt positions start, start+1, ...: each token's logprob given the ones before it, and the top k."""
        if self.scores is not None:
            self.scores[start:start + len(scores)] = scores
            self.scores_in = max(self.scores_in, start + len(scores))

    # ---- what the row emits -------------------------------------------------------------------------------
    def flush(self, final: bool = False) -> bool:
        """Emit what is ready; returns whether the row has finished (its `Finished` event sent). `final`: nothing
        more will be computed for this row, so whatever is pending goes out as it is."""
        if self.done:
            return True
        if self.scores is not None:
            if self.scores_in < self.prompt_len and not final:
                return False
            self.emit(PromptLogprobs(self.scores))
            self.scores = None
        if self.prompt_due:
            if self.read < self.prompt_len - 1 and not final:
                return False
            self.emit(PromptFeatures([TokenFeaturesOut(p, self.req.prompt_ids[p], self._latents_at(p))
                                      for p in range(self.prompt_len)]))
            self.prompt_due = False
        while self.pending:
            ev = self.pending[0]
            if self.waits and ev.position > self.read and not final:
                break  # not read by a forward yet: its latents and stop conditions are not known
            if self.top_k:
                ev.features = self._latents_at(ev.position)
            self.emit(self.pending.popleft())
            self.emitted_chars += len(ev.text)
            if ev.position in self.stop_hits:  # stop_when: this token set off a watched latent
                self.stop_at(ev.position - self.prompt_len + 1)
        if self.pending or (self.reason is None and not final):
            return False
        self.end()
        self.emit(self.finished(self.reason or "length"))
        return True

    def stop_at(self, n: int) -> None:
        """End with "stop" after the first `n` generated tokens (an engine that sampled ahead drops the rest)."""
        self.generated = n
        self.detok.truncate(n, self.emitted_chars)
        self.pending.clear()
        self.eos_token = None  # sampled after the cut
        self.reason = "stop"

    def finished(self, reason: str) -> Finished:
        """The final event: the reason, the text held back so far, and the token counts."""
        return Finished(reason, self.detok.finish(), self.prompt_len, self.generated, self.eos_token)

    def _latents_at(self, pos: int) -> Latents:
        """This row's reported latents at `pos` (an SAE whose latents never came is left out)."""
        return {name: got for name in self.report if (got := self.latents[name].pop(pos, None)) is not None}
