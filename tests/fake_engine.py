"""A scripted `Engine` for the fast HTTP tier: no model, no torch forward. It generates token ids counting up
from the prompt's last one, reports one latent per token, and can be told to answer like a full queue, so the
HTTP layer (protocol, handlers, routes, the error envelope, auth, streaming) is tested in milliseconds."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from saelora.serve.core.engine import (Engine, EngineError, Event, Finished, GenerationRequest, PromptFeatures,
                                       PromptLogprobs, TokenEvent, TokenFeaturesOut, check_request)
from tiny import WORDS, tiny_tokenizer

SAE_INFO = {"name": "fake", "hook": "blocks.0.hook_resid_post", "architecture": "standard", "d_in": 8, "d_sae": 16,
            "source": "/nonexistent/fake-sae", "fingerprint": {"id": "fake"},
            "policy": {"keep_first": True, "keep_token_ids": [], "prepend_bos": False, "keep_norm_above": None}}


class FakeEngine(Engine):
    def __init__(self, full: bool = False, max_len: int = 64, capacity: int | None = None,
                 fail_at: int | None = None, token_s: float = 0.0) -> None:
        self.tokenizer = tiny_tokenizer([" ".join(WORDS)])
        self.model_id, self.full, self._max_len = "fake", full, max_len
        self.capacity, self.running = capacity, 0  # generations at once before queue_full (None: no limit)
        self.fail_at = fail_at  # raise a plain error at this generated token (a failing row)
        self.token_s = token_s  # seconds per generated token
        self.closed_early = 0  # generations closed before they finished (client gone)
        self.loaded: dict[str, str] = {}
        self.requests: list[GenerationRequest] = []  # what the HTTP layer handed over
        self._ready = False

    async def start(self) -> None:
        self._ready = True

    async def stop(self) -> None:
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def max_model_len(self) -> int:
        return self._max_len

    def _latents(self, token_id: int, top_k: int) -> dict[str, tuple[list[int], list[float]]] | None:
        return {"fake": ([token_id % 16], [1.0])} if top_k else None

    async def generate(self, r: GenerationRequest) -> AsyncIterator[Event]:
        """Like the real engines, an async generator: its errors surface on the first iteration."""
        if self.full or (self.capacity is not None and self.running >= self.capacity):
            raise EngineError("queue_full", "the queue is full")
        r = check_request(r, self.saes(), len(self.tokenizer), self._max_len)  # the engines' one admission check
        self.requests.append(r)
        self.running += 1
        finished = False
        try:
            async for ev in self._events(r):
                finished = isinstance(ev, Finished)
                yield ev
        finally:
            self.running -= 1
            self.closed_early += not finished

    async def _events(self, r: GenerationRequest) -> AsyncIterator[Event]:
        n, vocab, top_k = len(r.prompt_ids), len(self.tokenizer), r.splice.top_k
        k = r.sampling.prompt_logprobs
        if k is not None:  # each prompt token scored -1, ranked first
            yield PromptLogprobs([None] + [(-1.0, 1, [(t, -1.0)][:k]) for t in r.prompt_ids[1:]])
        if r.splice.include_prompt and top_k:
            yield PromptFeatures([TokenFeaturesOut(i, t, self._latents(t, top_k) or {})
                                  for i, t in enumerate(r.prompt_ids)])
        tok = r.prompt_ids[-1]
        for i in range(r.sampling.max_tokens):
            await asyncio.sleep(self.token_s)
            if self.fail_at is not None and i == self.fail_at:
                raise RuntimeError("a step failed")
            tok = 3 + (tok + 1) % (vocab - 3)  # never a special token
            yield TokenEvent(tok, n + i, " " + self.tokenizer.decode([tok]), features=self._latents(tok, top_k))
        yield Finished("length", "", n, r.sampling.max_tokens)

    async def encode(self, prompt_ids: list[int], top_k: int, saes: list[str] | None,
                     adapter: str | None) -> list[TokenFeaturesOut]:
        return [TokenFeaturesOut(i, t, self._latents(t, top_k) or {}) for i, t in enumerate(prompt_ids)]

    def saes(self) -> list[dict[str, Any]]:
        return [SAE_INFO]

    def adapters(self) -> list[dict[str, Any]]:
        return [{"name": n, "path": p, "rank": 4, "saes": ["fake"]} for n, p in self.loaded.items()]

    async def load_adapter(self, name: str, path: str) -> dict[str, Any]:
        if name in self.loaded:
            raise EngineError("conflict", f"adapter {name!r} is already loaded", "lora_name")
        self.loaded[name] = path
        return {"name": name, "path": path}

    async def unload_adapter(self, name: str) -> None:
        if self.loaded.pop(name, None) is None:
            raise EngineError("not_found", f"no adapter {name!r}", "lora_name")

    def stats(self) -> dict[str, float]:
        return {"running": 0.0, "queued": 0.0, "adapters": float(len(self.loaded))}
