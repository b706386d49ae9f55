"""Which threads of a running `saelora serve --engine vllm` use the CPU while it decodes.

The question (docs/performance.md, sixth pass): in-process, a second OpenMP team in the process tripled the LoRA
matmul time; does anything in a live server start one? One server (embedded model, shipped SAE, one rank-16
all-linear adapter); 4 greedy streams of `--tokens` tokens, alternating base and LoRA, `--pairs` pairs. Per load,
each OS thread's CPU ticks (utime + stime from /proc, 100 a second) and the tokens/s. A second busy team would
show as more than two threads (the engine thread and its one OpenMP worker, on 2 cores) with many ticks.
Writes bench/results/server_threads.{json,md}.

    python bench/server_threads.py [--pairs 3] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.serve import _bodies, _run, make_adapters, server  # noqa: E402

log = logging.getLogger("bench.server_threads")
RESULTS = Path(__file__).parent / "results"


def thread_ticks(pid: int) -> dict[str, int]:
    """OS thread id -> CPU ticks used so far (user + system)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except FileNotFoundError:  # the thread ended
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[tid] = int(fields[11]) + int(fields[12])
    return out


def one_load(url: str, pid: int, model: str, tokens: int) -> dict:
    before = thread_ticks(pid)
    dt, toks, fails = asyncio.run(_run(url, _bodies(4, tokens, model=model, sae={"mode": "off"})))
    after = thread_ticks(pid)
    busy = sorted((after[t] - before.get(t, 0) for t in after if after[t] > before.get(t, 0)), reverse=True)
    return {"model": model, "tok_s": round(toks / dt, 1), "seconds": round(dt, 2), "failures": fails,
            "threads": len(after), "busy_ticks": busy, "ticks_beyond_top2": sum(busy[2:])}


def main() -> int:
    from saelora.adapters.config import DEFAULT_MODEL
    from saelora.adapters.saes import shipped_sae

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    sae = str(shipped_sae(DEFAULT_MODEL))
    root = Path(tempfile.mkdtemp(prefix="saelora-bench-"))
    name = make_adapters(root, sae, 1, rank=16)[0]
    srv = server(sae, root, 8791, engine="vllm")
    try:
        httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": "cost", "lora_path": name},
                   timeout=120).raise_for_status()
        asyncio.run(_run(srv.url, _bodies(4, 16, sae={"mode": "off"})))  # warm-up
        loads = [one_load(srv.url, srv.proc.pid, model, args.tokens)
                 for _ in range(args.pairs) for model in (DEFAULT_MODEL, "cost")]
    finally:
        srv.close()
    res = {"settings": vars(args), "cores": len(os.sched_getaffinity(0)), "loads": loads}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "server_threads.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = ["| load | tok/s | threads | busy ticks per thread | ticks beyond the top two |", "|---|---|---|---|---|"]
    lines += [f"| {x['model']} | {x['tok_s']} | {x['threads']} | {x['busy_ticks']} | {x['ticks_beyond_top2']} |"
              for x in loads]
    (RESULTS / "server_threads.md").write_text("\n".join(lines) + "\n")
    log.info("\n%s", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
