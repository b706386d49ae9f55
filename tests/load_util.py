"""Bounded load: a burst of concurrent clients (streaming completions; mixed with `/v1/features` and long prompts)
and the invariants about its outcome (every accepted request completes, every stream with [DONE], every refused
one is a 429 with Retry-After, nothing is a 5xx). Used by
tests/serve/test_load.py and bench/serve_load.py (which records the figures)."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import httpx


async def _one(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code, "retry_after": r.headers.get("retry-after"),
                    "seconds": time.perf_counter() - t0}
        lines = [ln async for ln in r.aiter_lines() if ln.startswith("data: ")]
    return {"status": 200, "done": bool(lines) and lines[-1] == "data: [DONE]",
            "errors": sum('"error"' in ln for ln in lines), "seconds": time.perf_counter() - t0}


async def _one_json(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    r = await client.post(path, json=body)
    return {"status": r.status_code, "retry_after": r.headers.get("retry-after"), "done": r.status_code == 200,
            "errors": 0, "seconds": time.perf_counter() - t0}


LONG_PROMPT = "The cat sat on the mat and looked at the rain over the quiet town. " * 8  # ~130 tokens


def _client_call(client: httpx.AsyncClient, i: int, max_tokens: int, model: str | None, mix: bool) -> Any:
    """Client i's request: a streamed completion; with `mix`, every third one `/v1/features` on a long text and
    every third a plain completion of a long prompt."""
    named = {"model": model} if model else {}
    kind = i % 3 if mix else 0
    if kind == 1:
        return _one_json(client, "/v1/features", {**named, "input": LONG_PROMPT, "top_k": 4})
    if kind == 2:
        return _one_json(client, "/v1/completions", {**named, "prompt": LONG_PROMPT, "max_tokens": max_tokens,
                                                     "temperature": 0})
    return _one(client, {**named, "prompt": "The capital of France is", "max_tokens": max_tokens,
                         "temperature": 0, "stream": True})


async def burst(url: str, streams: int, max_tokens: int = 16, model: str | None = None,
                mix: bool = False) -> dict[str, Any]:
    """`streams` clients at once (streamed completions; with `mix`, also features and long prompts); returns the
    counts the invariants are about."""
    limits = httpx.Limits(max_connections=streams + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        out = await asyncio.gather(*[_client_call(client, i, max_tokens, model, mix) for i in range(streams)])
        wall = time.perf_counter() - t0
    accepted = [o for o in out if o["status"] == 200]
    return {"streams": streams, "accepted": len(accepted), "done": sum(o["done"] for o in accepted),
            "stream_errors": sum(o["errors"] for o in accepted),
            "refused_429": sum(o["status"] == 429 for o in out),
            "refused_with_retry_after": sum(o["status"] == 429 and o["retry_after"] is not None for o in out),
            "server_errors": sum(o["status"] >= 500 for o in out),
            "other": sorted({o["status"] for o in out} - {200, 429}),
            "wall_s": round(wall, 2),
            "accepted_latency_s": {"median": round(statistics.median(o["seconds"] for o in accepted), 3),
                                   "max": round(max(o["seconds"] for o in accepted), 3)} if accepted else None}


def invariants_hold(res: dict[str, Any]) -> bool:
    return (res["done"] == res["accepted"] and res["stream_errors"] == 0 and res["server_errors"] == 0
            and res["accepted"] + res["refused_429"] == res["streams"]
            and res["refused_with_retry_after"] == res["refused_429"])
