"""Bounded load: a burst of concurrent streaming completions and the invariants about its outcome (every
accepted stream ends with [DONE], every refused one is a 429 with Retry-After, nothing is a 5xx). Used by
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


async def burst(url: str, streams: int, max_tokens: int = 16, model: str | None = None) -> dict[str, Any]:
    """Open `streams` streaming completions at once; returns the counts the invariants are about."""
    body: dict[str, Any] = {"prompt": "The capital of France is", "max_tokens": max_tokens, "temperature": 0,
                            "stream": True}
    if model:
        body["model"] = model
    limits = httpx.Limits(max_connections=streams + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        out = await asyncio.gather(*[_one(client, body) for _ in range(streams)])
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
