"""Typed Python clients for a saelora server (httpx + pydantic; never imports torch).

    from saelora.clients import SaeloraClient, Edit
    c = SaeloraClient("http://127.0.0.1:8000")
    c.features("The capital of France is")              # per-token top latents, no generation
    c.steer("The capital of France is", [Edit.set(123, 8.0)])
    c.adapters.load("mine", "mine")                      # relative to the server's --adapter-root

Both clients run the calls declared once in endpoints.py; `AsyncSaeloraClient` offers every call
`SaeloraClient` does (tests/test_client.py checks it), awaited.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Iterator, Sequence

import httpx

from . import endpoints as E
from . import protocol as P
from . import protocol_steer as PS
from .edits import Edit, Vector
from .namespaces import (_Adapters, _AsyncAdapters, _AsyncPresets, _AsyncSAEs, _AsyncVectors, _Presets, _SAEs,
                         _Vectors)
from .endpoints import DONE, Call, kept_by_policy, sse_data
from .errors import RateLimitError, ServiceUnavailableError, from_response

RETRYABLE = (RateLimitError, ServiceUnavailableError)


def _retry_delay(attempt: int, headers: httpx.Headers | None) -> float:
    """Seconds to wait before retry `attempt`: the server's Retry-After (else 0.5 s), doubled each time."""
    after = headers.get("retry-after") if headers is not None else None
    base = float(after) if after and after.replace(".", "", 1).isdigit() else 0.5
    return min(30.0, base * (2 ** attempt))


def _check(r: httpx.Response) -> Any:
    try:
        body = r.json()
    except ValueError:
        body = r.text
    if r.status_code >= 400:
        raise from_response(r.status_code, body)
    return body


class _Base:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, model: str | None = None,
                 timeout: float = 120.0, max_retries: int = 3) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model, self.timeout, self.max_retries = model, timeout, max_retries


class SaeloraClient(_Base):
    """Blocking client."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=self.timeout)
        self.adapters = _Adapters(self)
        self.saes = _SAEs(self)
        self.presets = _Presets(self)
        self.vectors = _Vectors(self)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "SaeloraClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, json_body: Any = None) -> Any:
        """Send one request, retrying 429/503 with backoff; the answer's JSON, or a typed error."""
        for attempt in range(self.max_retries + 1):
            r = self.http.request(method, path, json=json_body)
            try:
                return _check(r)
            except RETRYABLE:
                if attempt == self.max_retries:
                    raise
                time.sleep(_retry_delay(attempt, r.headers))
        raise AssertionError("unreachable")

    def run(self, call: Call) -> Any:
        return call.parse(self.request(call.method, call.path, call.body))

    def _events(self, call: Call) -> Iterator[Any]:
        with self.http.stream(call.method, call.path, json=call.body) as r:
            if r.status_code >= 400:
                r.read()
                _check(r)
            for line in r.iter_lines():
                data = sse_data(line)
                if data is DONE:
                    return
                if data is not None:
                    yield call.parse(data)

    def default_model(self) -> str:
        if self.model is None:
            self.model = self.models().data[0].id
        return self.model

    def _model(self, kw: dict[str, Any]) -> str:
        return kw.pop("model", None) or self.default_model()

    # ---- endpoints ----------------------------------------------------------------------------------------
    def models(self) -> P.ModelList:
        return self.run(E.models())

    def complete(self, prompt: str | list[int], **kw: Any) -> P.CompletionResponse:
        return self.run(E.complete(self._model(kw), prompt, **kw))

    def stream(self, prompt: str | list[int], **kw: Any) -> Iterator[dict[str, Any]]:
        yield from self._events(E.complete(self._model(kw), prompt, stream=True, **kw))

    def chat(self, messages: Sequence[dict[str, Any]], **kw: Any) -> P.ChatCompletionResponse:
        return self.run(E.chat(self._model(kw), messages, **kw))

    def stream_chat(self, messages: Sequence[dict[str, Any]], **kw: Any) -> Iterator[P.ChatCompletionChunk]:
        yield from self._events(E.chat(self._model(kw), messages, stream=True, **kw))

    def features(self, text: str | None = None, messages: Sequence[dict[str, Any]] | None = None, top_k: int = 8,
                 saes: list[str] | None = None, model: str | None = None) -> P.FeaturesResponse:
        return self.run(E.features(model or self.default_model(), text, messages, top_k, saes))

    def steer(self, prompt: str, edits: Sequence[P.SAEEdit] = (), top_k: int = 0, mode: str | None = None,
              preset: str | None = None, stop_when: Sequence[P.SAECondition] = (), compare: bool = False,
              **kw: Any) -> P.CompletionResponse:
        """A completion with a preset and/or edits; `compare=True` adds each choice's `unsteered` twin."""
        return self.complete(prompt, sae=E.steer_options(edits, top_k, mode, preset, stop_when, compare), **kw)

    def feature(self, sae: str, index: int) -> P.FeatureDescription:
        return self.run(E.feature(sae, index))

    # ---- experiments --------------------------------------------------------------------------------------
    def compare(self, prompt: str, edits: Sequence[P.SAEEdit] = (), max_tokens: int = 32, top_k: int = 8,
                preset: str | None = None, **kw: Any) -> dict[str, Any]:
        """Steered and default greedy completions side by side (one `compare: true` call: same batch, same seed),
        with the latents whose mean changed most."""
        kw = {"max_tokens": max_tokens, "temperature": 0.0, **kw}
        steered = self.steer(prompt, edits, top_k=top_k, preset=preset, compare=True, **kw).choices[0]
        return E.compare_result(prompt, steered)

    def contrast(self, prompts_a: Sequence[str], prompts_b: Sequence[str], top_k: int = 32,
                 n: int = 10, ranking: str = E.DEFAULT_RANKING, lens: bool = False) -> list[dict[str, Any]]:
        """The latents that most tell prompt set A from set B (`endpoints.contrast_result`: by default the
        standardised mean difference with always-on latents excluded; "mean_diff" is the old raw ranking).
        `lens=True` adds each latent's logit-lens agreement with set A's frequent tokens (`lens_agreement`)."""
        a = [self.features(p, top_k=top_k) for p in prompts_a]
        b = [self.features(p, top_k=top_k) for p in prompts_b]
        out = E.contrast_result(a, b, n, self.saes.list(), ranking)
        for d in out if lens else []:
            logits = self.feature(d["sae"], d["feature"]).logits
            d["lens"] = round(E.lens_agreement([t.token for t in logits.promoted] if logits else [], a, b), 4)
        return out

    def search(self, sae: str, q: str, n: int = 10) -> PS.SearchResponse:
        """Latents whose feature descriptions (top contexts, promoted tokens) match the query words."""
        return self.run(E.search(sae, q, n))

    def similar(self, sae: str, index: int, n: int = 10) -> PS.SimilarResponse:
        """The latents closest to `index` by decoder cosine."""
        return self.run(E.similar(sae, index, n))

    def auto_steer(self, name: str, positive: Sequence[str], negative: Sequence[str] | None = None,
                   prompts: Sequence[str] | None = None, max_fluency_gap: float = 0.5,
                   sae: str | None = None) -> PS.AutoSteerResponse:
        """Search, sweep and judge on the server; the winner is stored as preset `name` (admin key)."""
        return self.run(E.auto_steer(name, positive, negative, prompts, max_fluency_gap, sae))


class AsyncSaeloraClient(_Base):
    """Asynchronous client with the same calls as `SaeloraClient`, awaited (streams are async iterators)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=self.timeout)
        self.adapters = _AsyncAdapters(self)
        self.saes = _AsyncSAEs(self)
        self.presets = _AsyncPresets(self)
        self.vectors = _AsyncVectors(self)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def close(self) -> None:
        await self.aclose()

    async def __aenter__(self) -> "AsyncSaeloraClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def request(self, method: str, path: str, json_body: Any = None) -> Any:
        """Send one request, retrying 429/503 with backoff; the answer's JSON, or a typed error."""
        for attempt in range(self.max_retries + 1):
            r = await self.http.request(method, path, json=json_body)
            try:
                return _check(r)
            except RETRYABLE:
                if attempt == self.max_retries:
                    raise
                await asyncio.sleep(_retry_delay(attempt, r.headers))
        raise AssertionError("unreachable")

    async def run(self, call: Call) -> Any:
        return call.parse(await self.request(call.method, call.path, call.body))

    async def _events(self, call: Call) -> AsyncIterator[Any]:
        async with self.http.stream(call.method, call.path, json=call.body) as r:
            if r.status_code >= 400:
                await r.aread()
                _check(r)
            async for line in r.aiter_lines():
                data = sse_data(line)
                if data is DONE:
                    return
                if data is not None:
                    yield call.parse(data)

    async def default_model(self) -> str:
        if self.model is None:
            self.model = (await self.models()).data[0].id
        return self.model

    async def _model(self, kw: dict[str, Any]) -> str:
        return kw.pop("model", None) or await self.default_model()

    # ---- endpoints ----------------------------------------------------------------------------------------
    async def models(self) -> P.ModelList:
        return await self.run(E.models())

    async def complete(self, prompt: str | list[int], **kw: Any) -> P.CompletionResponse:
        return await self.run(E.complete(await self._model(kw), prompt, **kw))

    async def stream(self, prompt: str | list[int], **kw: Any) -> AsyncIterator[dict[str, Any]]:
        async for data in self._events(E.complete(await self._model(kw), prompt, stream=True, **kw)):
            yield data

    async def chat(self, messages: Sequence[dict[str, Any]], **kw: Any) -> P.ChatCompletionResponse:
        return await self.run(E.chat(await self._model(kw), messages, **kw))

    async def stream_chat(self, messages: Sequence[dict[str, Any]], **kw: Any) -> AsyncIterator[P.ChatCompletionChunk]:
        async for chunk in self._events(E.chat(await self._model(kw), messages, stream=True, **kw)):
            yield chunk

    async def features(self, text: str | None = None, messages: Sequence[dict[str, Any]] | None = None,
                       top_k: int = 8, saes: list[str] | None = None, model: str | None = None) -> P.FeaturesResponse:
        return await self.run(E.features(model or await self.default_model(), text, messages, top_k, saes))

    async def steer(self, prompt: str, edits: Sequence[P.SAEEdit] = (), top_k: int = 0, mode: str | None = None,
                    preset: str | None = None, stop_when: Sequence[P.SAECondition] = (), compare: bool = False,
                    **kw: Any) -> P.CompletionResponse:
        return await self.complete(prompt, sae=E.steer_options(edits, top_k, mode, preset, stop_when, compare),
                                   **kw)

    async def feature(self, sae: str, index: int) -> P.FeatureDescription:
        return await self.run(E.feature(sae, index))

    async def load_adapter(self, name: str, path: str) -> dict[str, Any]:
        """Same as `adapters.load` (kept for existing callers)."""
        return await self.adapters.load(name, path)

    async def unload_adapter(self, name: str) -> dict[str, Any]:
        """Same as `adapters.unload` (kept for existing callers)."""
        return await self.adapters.unload(name)

    # ---- experiments --------------------------------------------------------------------------------------
    async def compare(self, prompt: str, edits: Sequence[P.SAEEdit] = (), max_tokens: int = 32, top_k: int = 8,
                      preset: str | None = None, **kw: Any) -> dict[str, Any]:
        """See `SaeloraClient.compare`."""
        kw = {"max_tokens": max_tokens, "temperature": 0.0, **kw}
        steered = await self.steer(prompt, edits, top_k=top_k, preset=preset, compare=True, **kw)
        return E.compare_result(prompt, steered.choices[0])

    async def contrast(self, prompts_a: Sequence[str], prompts_b: Sequence[str], top_k: int = 32,
                       n: int = 10, ranking: str = E.DEFAULT_RANKING, lens: bool = False) -> list[dict[str, Any]]:
        """See `SaeloraClient.contrast`; the prompts are sent concurrently."""
        a = await asyncio.gather(*[self.features(p, top_k=top_k) for p in prompts_a])
        b = await asyncio.gather(*[self.features(p, top_k=top_k) for p in prompts_b])
        out = E.contrast_result(a, b, n, await self.saes.list(), ranking)
        for d in out if lens else []:
            logits = (await self.feature(d["sae"], d["feature"])).logits
            d["lens"] = round(E.lens_agreement([t.token for t in logits.promoted] if logits else [], a, b), 4)
        return out

    async def search(self, sae: str, q: str, n: int = 10) -> PS.SearchResponse:
        return await self.run(E.search(sae, q, n))

    async def similar(self, sae: str, index: int, n: int = 10) -> PS.SimilarResponse:
        return await self.run(E.similar(sae, index, n))

    async def auto_steer(self, name: str, positive: Sequence[str], negative: Sequence[str] | None = None,
                         prompts: Sequence[str] | None = None, max_fluency_gap: float = 0.5,
                         sae: str | None = None) -> PS.AutoSteerResponse:
        """See `SaeloraClient.auto_steer`."""
        return await self.run(E.auto_steer(name, positive, negative, prompts, max_fluency_gap, sae))


__all__ = ["AsyncSaeloraClient", "Edit", "SaeloraClient", "Vector", "kept_by_policy"]
