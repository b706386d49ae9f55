"""Typed Python clients for a saelora server (httpx + pydantic; never imports torch).

    from saelora.clients import SaeloraClient, Edit
    c = SaeloraClient("http://127.0.0.1:8000")
    c.features("The capital of France is")              # per-token top latents, no generation
    c.steer("The capital of France is", [Edit.set(123, 8.0)])
    c.adapters.load("mine", "mine")                      # relative to the server's --adapter-root
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Iterator, Sequence

import httpx

from . import protocol as P
from .errors import RateLimitError, ServiceUnavailableError, from_response

RETRYABLE = (RateLimitError, ServiceUnavailableError)


class Edit:
    """Latent edits for the `sae.edits` field: Edit.set(f, v), Edit.add, Edit.scale, Edit.clamp_max,
    Edit.clamp_min, Edit.ablate(f)."""

    @staticmethod
    def make(op: str, feature: int, value: float = 0.0, sae: str | None = None,
             positions: str | list[int] = "all") -> P.SAEEdit:
        return P.SAEEdit(sae=sae, feature=feature, op=op, value=value, positions=positions)  # type: ignore[arg-type]

    @staticmethod
    def set(feature: int, value: float, **kw: Any) -> P.SAEEdit:
        return Edit.make("set", feature, value, **kw)

    @staticmethod
    def add(feature: int, value: float, **kw: Any) -> P.SAEEdit:
        return Edit.make("add", feature, value, **kw)

    @staticmethod
    def scale(feature: int, value: float, **kw: Any) -> P.SAEEdit:
        return Edit.make("scale", feature, value, **kw)

    @staticmethod
    def clamp_max(feature: int, value: float, **kw: Any) -> P.SAEEdit:
        return Edit.make("clamp_max", feature, value, **kw)

    @staticmethod
    def clamp_min(feature: int, value: float, **kw: Any) -> P.SAEEdit:
        return Edit.make("clamp_min", feature, value, **kw)

    @staticmethod
    def ablate(feature: int, **kw: Any) -> P.SAEEdit:
        return Edit.make("ablate", feature, 0.0, **kw)


def _retry_delay(attempt: int, headers: httpx.Headers | None) -> float:
    """Seconds to wait before retry `attempt`: the server's Retry-After (else 0.5 s), doubled each time."""
    after = headers.get("retry-after") if headers is not None else None
    base = float(after) if after and after.replace(".", "", 1).isdigit() else 0.5
    return min(30.0, base * (2 ** attempt))


class _Base:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, model: str | None = None,
                 timeout: float = 120.0, max_retries: int = 3) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model, self.timeout, self.max_retries = model, timeout, max_retries

    @staticmethod
    def _body(model: Any) -> dict[str, Any]:
        return model.model_dump(exclude_none=True) if hasattr(model, "model_dump") else model

    @staticmethod
    def _check(r: httpx.Response) -> Any:
        try:
            body = r.json()
        except ValueError:
            body = r.text
        if r.status_code >= 400:
            raise from_response(r.status_code, body)
        return body


class SaeloraClient(_Base):
    """Blocking client."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=self.timeout)
        self.adapters = _Adapters(self)
        self.saes = _SAEs(self)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "SaeloraClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, json_body: Any = None) -> Any:
        for attempt in range(self.max_retries + 1):
            r = self.http.request(method, path, json=json_body)
            try:
                return self._check(r)
            except RETRYABLE:
                if attempt == self.max_retries:
                    raise
                time.sleep(_retry_delay(attempt, r.headers))
        raise AssertionError("unreachable")

    def default_model(self) -> str:
        if self.model is None:
            self.model = self.models().data[0].id
        return self.model

    # ---- endpoints ----------------------------------------------------------------------------------------
    def models(self) -> P.ModelList:
        return P.ModelList.model_validate(self.request("GET", "/v1/models"))

    def complete(self, prompt: str | list[int], **kw: Any) -> P.CompletionResponse:
        req = P.CompletionRequest(model=kw.pop("model", None) or self.default_model(), prompt=prompt, **kw)
        return P.CompletionResponse.model_validate(self.request("POST", "/v1/completions", self._body(req)))

    def chat(self, messages: Sequence[dict[str, Any]], **kw: Any) -> P.ChatCompletionResponse:
        req = P.ChatCompletionRequest(model=kw.pop("model", None) or self.default_model(), messages=messages, **kw)
        return P.ChatCompletionResponse.model_validate(self.request("POST", "/v1/chat/completions", self._body(req)))

    def stream_chat(self, messages: Sequence[dict[str, Any]], **kw: Any) -> Iterator[P.ChatCompletionChunk]:
        req = P.ChatCompletionRequest(model=kw.pop("model", None) or self.default_model(), messages=messages,
                                      stream=True, **kw)
        for data in self._sse("/v1/chat/completions", self._body(req)):
            yield P.ChatCompletionChunk.model_validate(data)

    def stream(self, prompt: str | list[int], **kw: Any) -> Iterator[dict[str, Any]]:
        req = P.CompletionRequest(model=kw.pop("model", None) or self.default_model(), prompt=prompt, stream=True, **kw)
        yield from self._sse("/v1/completions", self._body(req))

    def _sse(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        with self.http.stream("POST", path, json=body) as r:
            if r.status_code >= 400:
                r.read()
                self._check(r)
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return
                data = json.loads(line[6:])
                if "error" in data:
                    raise from_response(data["error"].get("code") or 500, data)
                yield data

    def features(self, text: str | None = None, messages: Sequence[dict[str, Any]] | None = None, top_k: int = 8,
                 saes: list[str] | None = None, model: str | None = None) -> P.FeaturesResponse:
        req = P.FeaturesRequest(model=model or self.default_model(), input=text, messages=messages, top_k=top_k,
                                saes=saes)
        return P.FeaturesResponse.model_validate(self.request("POST", "/v1/features", self._body(req)))

    def steer(self, prompt: str, edits: Sequence[P.SAEEdit], top_k: int = 0, mode: str = "error_term",
              **kw: Any) -> P.CompletionResponse:
        sae = P.SAEOptions(mode=mode, edits=list(edits), features=P.SAEFeatureOptions(top_k=top_k) if top_k else None)
        return self.complete(prompt, sae=sae, **kw)

    def feature(self, sae: str, index: int) -> P.FeatureDescription:
        return P.FeatureDescription.model_validate(self.request("GET", f"/v1/saes/{sae}/features/{index}"))

    # ---- experiments --------------------------------------------------------------------------------------
    def compare(self, prompt: str, edits: Sequence[P.SAEEdit], max_tokens: int = 32, top_k: int = 8,
                **kw: Any) -> dict[str, Any]:
        """Steered and default greedy completions side by side, with the latents whose mean changed most."""
        kw = {"max_tokens": max_tokens, "temperature": 0.0, **kw}
        default = self.steer(prompt, [], top_k=top_k, **kw).choices[0]
        steered = self.steer(prompt, edits, top_k=top_k, **kw).choices[0]
        return {"prompt": prompt, "default": default.text, "steered": steered.text,
                "changed": _latent_changes(default.features, steered.features)}

    def contrast(self, prompts_a: Sequence[str], prompts_b: Sequence[str], top_k: int = 32,
                 n: int = 10) -> list[dict[str, Any]]:
        """Latents whose mean activation (top-k sparse, over the tokens each SAE's position policy splices: not
        the attention sink or BOS/EOS) differs most between two prompt sets."""
        policies = {s.id: s.policy for s in self.saes.list().data}
        return _contrast([self.features(p, top_k=top_k) for p in prompts_a],
                         [self.features(p, top_k=top_k) for p in prompts_b], n, policies)


class _Adapters:
    def __init__(self, c: SaeloraClient) -> None:
        self.c = c

    def list(self) -> P.AdapterList:
        return P.AdapterList.model_validate(self.c.request("GET", "/v1/adapters"))

    def load(self, name: str, path: str) -> dict[str, Any]:
        return self.c.request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})

    def unload(self, name: str) -> dict[str, Any]:
        return self.c.request("POST", "/v1/unload_lora_adapter", {"lora_name": name})


class _SAEs:
    def __init__(self, c: SaeloraClient) -> None:
        self.c = c

    def list(self) -> P.SAEList:
        return P.SAEList.model_validate(self.c.request("GET", "/v1/saes"))


def kept_by_policy(policy: dict[str, Any] | None, t: P.TokenFeatures) -> bool:
    """Whether an SAE's position policy (as /v1/saes lists it) leaves this token original."""
    if not policy:
        return False
    return (bool(policy.get("keep_first")) and t.position == 0) or t.token_id in policy.get("keep_token_ids", ())


def _mean_latents(tokens: Sequence[P.TokenFeatures],
                  policies: dict[str, dict[str, Any] | None] | None = None) -> dict[tuple[str, int], float]:
    """Mean latent value per (sae, feature) over the tokens each SAE is spliced at (all, without policies)."""
    sums: dict[tuple[str, int], float] = {}
    counts: dict[str, int] = {}
    for t in tokens:
        for f in t.features:
            if policies is not None and kept_by_policy(policies.get(f.sae), t):
                continue
            counts[f.sae] = counts.get(f.sae, 0) + 1
            for i, v in zip(f.indices, f.values, strict=True):
                sums[(f.sae, i)] = sums.get((f.sae, i), 0.0) + v
    return {k: v / max(1, counts[k[0]]) for k, v in sums.items()}


def _latent_changes(a: P.ChoiceFeatures | None, b: P.ChoiceFeatures | None, n: int = 10) -> list[dict[str, Any]]:
    ma, mb = _mean_latents(a.generated if a else []), _mean_latents(b.generated if b else [])
    keys = sorted(set(ma) | set(mb), key=lambda k: -abs(mb.get(k, 0.0) - ma.get(k, 0.0)))[:n]
    return [{"sae": k[0], "feature": k[1], "default": round(ma.get(k, 0.0), 4), "steered": round(mb.get(k, 0.0), 4)}
            for k in keys]


def _contrast(a: Sequence[P.FeaturesResponse], b: Sequence[P.FeaturesResponse], n: int,
              policies: dict[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
    # Tokens an SAE's position policy keeps original (the attention sink, BOS/EOS) are left out, as in training.
    ma = _mean_latents([t for r in a for t in r.tokens], policies)
    mb = _mean_latents([t for r in b for t in r.tokens], policies)
    keys = sorted(set(ma) | set(mb), key=lambda k: -abs(ma.get(k, 0.0) - mb.get(k, 0.0)))[:n]
    return [{"sae": k[0], "feature": k[1], "mean_a": round(ma.get(k, 0.0), 4), "mean_b": round(mb.get(k, 0.0), 4),
             "diff": round(ma.get(k, 0.0) - mb.get(k, 0.0), 4)} for k in keys]


class AsyncSaeloraClient(_Base):
    """Asynchronous client with the same endpoints as `SaeloraClient`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=self.timeout)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> "AsyncSaeloraClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def request(self, method: str, path: str, json_body: Any = None) -> Any:
        for attempt in range(self.max_retries + 1):
            r = await self.http.request(method, path, json=json_body)
            try:
                return self._check(r)
            except RETRYABLE:
                if attempt == self.max_retries:
                    raise
                await asyncio.sleep(_retry_delay(attempt, r.headers))
        raise AssertionError("unreachable")

    async def default_model(self) -> str:
        if self.model is None:
            self.model = (await self.models()).data[0].id
        return self.model

    async def models(self) -> P.ModelList:
        return P.ModelList.model_validate(await self.request("GET", "/v1/models"))

    async def complete(self, prompt: str | list[int], **kw: Any) -> P.CompletionResponse:
        req = P.CompletionRequest(model=kw.pop("model", None) or await self.default_model(), prompt=prompt, **kw)
        return P.CompletionResponse.model_validate(await self.request("POST", "/v1/completions", self._body(req)))

    async def chat(self, messages: Sequence[dict[str, Any]], **kw: Any) -> P.ChatCompletionResponse:
        req = P.ChatCompletionRequest(model=kw.pop("model", None) or await self.default_model(), messages=messages,
                                      **kw)
        return P.ChatCompletionResponse.model_validate(
            await self.request("POST", "/v1/chat/completions", self._body(req)))

    async def stream(self, prompt: str | list[int], **kw: Any) -> AsyncIterator[dict[str, Any]]:
        req = P.CompletionRequest(model=kw.pop("model", None) or await self.default_model(), prompt=prompt,
                                  stream=True, **kw)
        async with self.http.stream("POST", "/v1/completions", json=self._body(req)) as r:
            if r.status_code >= 400:
                await r.aread()
                self._check(r)
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    return
                if line.startswith("data: "):
                    data = json.loads(line[6:])
                    if "error" in data:
                        raise from_response(data["error"].get("code") or 500, data)
                    yield data

    async def features(self, text: str, top_k: int = 8, saes: list[str] | None = None,
                       model: str | None = None) -> P.FeaturesResponse:
        req = P.FeaturesRequest(model=model or await self.default_model(), input=text, top_k=top_k, saes=saes)
        return P.FeaturesResponse.model_validate(await self.request("POST", "/v1/features", self._body(req)))

    async def steer(self, prompt: str, edits: Sequence[P.SAEEdit], top_k: int = 0, **kw: Any) -> P.CompletionResponse:
        sae = P.SAEOptions(edits=list(edits), features=P.SAEFeatureOptions(top_k=top_k) if top_k else None)
        return await self.complete(prompt, sae=sae, **kw)

    async def feature(self, sae: str, index: int) -> P.FeatureDescription:
        return P.FeatureDescription.model_validate(await self.request("GET", f"/v1/saes/{sae}/features/{index}"))

    async def load_adapter(self, name: str, path: str) -> dict[str, Any]:
        return await self.request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})

    async def unload_adapter(self, name: str) -> dict[str, Any]:
        return await self.request("POST", "/v1/unload_lora_adapter", {"lora_name": name})
