"""What both engines keep for one request in flight, and the rules they share: when a generation stops, what
a token's event holds, and how latents go on the wire."""

from __future__ import annotations

from typing import Any, Callable, Collection, Sequence

from .engine import Finished, GenerationRequest, TokenEvent
from .sampling import Detokenizer


class RowState:
    """One request in flight. Engines subclass it with their own bookkeeping (KV cache, vLLM request id)."""

    def __init__(self, req: GenerationRequest, emit: Callable[[Any], None], tokenizer: Any, eos: Collection[int],
                 sae_names: Sequence[str]) -> None:
        self.req, self.emit, self.eos = req, emit, eos
        self.prompt_len = len(req.prompt_ids)
        self.generated = 0  # tokens sampled, EOS included
        self.detok = Detokenizer(tokenizer, req.sampling.stop)
        self.report = list(req.splice.saes or sae_names)  # SAEs whose latents this request gets
        self.cancelled = False  # the client went away
        self.done = False
        self._registry: Any = None  # the adapter registry this row holds its adapter in, until `release`

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

    def accept(self, tok: int, logprob: float | None = None,
               top: list[tuple[int, float]] | None = None) -> tuple[TokenEvent | None, str | None]:
        """Count a sampled token. Returns its event (None for an end-of-sequence token, which is not shown) and
        the finish reason: "stop" (EOS or a stop string), "length" (max_tokens reached), or None to go on."""
        self.generated += 1
        if tok in self.eos and not self.req.sampling.ignore_eos:
            return None, "stop"
        delta, hit_stop = self.detok.add(tok)
        event = TokenEvent(tok, self.prompt_len + self.generated - 1, delta, logprob, top)
        return event, "stop" if hit_stop else "length" if self.generated >= self.req.sampling.max_tokens else None

    def stop_at(self, n: int, shown_chars: int) -> None:
        """End after the first `n` generated tokens, of which `shown_chars` characters of text went out (an engine
        that samples ahead drops the tokens after them); `finished` then releases the rest of those n tokens."""
        self.generated = n
        self.detok.truncate(n, shown_chars)

    def finished(self, reason: str) -> Finished:
        """The final event: the reason, the text held back so far, and the token counts."""
        return Finished(reason, self.detok.finish(), self.prompt_len, self.generated)


def wire_latents(indices: Sequence[int], values: Sequence[float], k: int) -> tuple[list[int], list[float]]:
    """A token's top-k latents as they go on the wire: the first k, inactive (zero) ones dropped, values rounded
    to 5 decimals."""
    pairs = [(int(i), round(float(v), 5)) for i, v in zip(indices[:k], values[:k], strict=True) if v != 0]
    return [i for i, _ in pairs], [v for _, v in pairs]
