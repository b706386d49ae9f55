"""Bounded load: many concurrent streams against a server with few slots. Every accepted stream must end with
`data: [DONE]`, every refused one must be a 429 with Retry-After, and nothing may be a 5xx; the same on both
engines. Writes bench/results/serve_load.{json,md} (counts and latencies; no timed assertions anywhere).

    python bench/serve_load.py                      # embedded model, torch and vLLM engines, 64 streams vs 8+8
    python bench/serve_load.py --engines torch --streams 96

`burst` and `invariants_hold` live in tests/load_util.py: `tests/serve/test_load.py` drives the same burst
against both engines on the tiny model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path


RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from load_util import burst, invariants_hold  # noqa: E402

log = logging.getLogger("bench.serve_load")


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
