"""Bounded load: many concurrent streams against a server with few slots. Every accepted stream must end with
`data: [DONE]`, every refused one must be a 429 with Retry-After, and nothing may be a 5xx; the same on both
engines. Writes bench/results/serve_load.{json,md} (counts and latencies; no timed assertions anywhere).

    python bench/serve_load.py                      # embedded model, torch and vLLM engines, 64 streams vs 8+8
    python bench/serve_load.py --engines torch --streams 96

`tests/serve/test_load.py` drives the same `burst` against both engines on the tiny model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

RESULTS = Path(__file__).parent / "results"
log = logging.getLogger("bench.serve_load")


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


def main() -> int:
    from saelora.launch import ServeProcess

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="torch,vllm")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    results = {}
    for engine in args.engines.split(","):
        serve = ["--engine", engine, "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue)]
        with ServeProcess(serve, timeout=600) as srv:
            results[engine] = asyncio.run(burst(srv.url, args.streams, args.max_tokens))
        results[engine]["invariants_hold"] = invariants_hold(results[engine])
        log.info("%s: %s", engine, results[engine])
    res = {"settings": vars(args), "results": results}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_load.json").write_text(json.dumps(res, indent=2) + "\n")
    md = ["# Bounded load (embedded SmolLM2-135M, 2 CPU cores)", "",
          f"{args.streams} concurrent streams of {args.max_tokens} tokens against --max-batch {args.max_batch} "
          f"--max-queue {args.max_queue}. Rerun: `python bench/serve_load.py`.", "",
          "| engine | accepted | ended with [DONE] | 429 (with Retry-After) | 5xx | wall s | accepted median / max s |",
          "|---|---|---|---|---|---|---|"]
    for engine, r in results.items():
        lat = r["accepted_latency_s"] or {}
        md.append(f"| {engine} | {r['accepted']} | {r['done']} | {r['refused_429']} ({r['refused_with_retry_after']}) "
                  f"| {r['server_errors']} | {r['wall_s']} | {lat.get('median')} / {lat.get('max')} |")
    (RESULTS / "serve_load.md").write_text("\n".join(md) + "\n")
    return 0 if all(r["invariants_hold"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
