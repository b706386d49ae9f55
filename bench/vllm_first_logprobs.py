"""The first logprobs request on the vLLM engine: saelora's eager rank op against vLLM's compiled one.

Each case runs in a fresh process (dynamo compiles once per process): an in-process `VllmEngine` (embedded
model, shipped SAE), one plain greedy request (engine warm-up), then the timed first request asking for
logprobs (1 token, top 1), then a second one. Cases: the ops `saelora` (as served: sampler_ops.py installed)
and `vllm` (the child puts vLLM's compiled op back after start-up), each with an empty inductor cache
(`TORCHINDUCTOR_CACHE_DIR` a new folder: a fresh machine) and then the same folder again (warm). Independent
of the timer, each case reports how many files inductor wrote to that folder. While the first request runs,
every other stream waits (the op runs inside the engine step). Writes bench/results/vllm_first_logprobs.{json,md}.

    python bench/vllm_first_logprobs.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.vllm_lora_step import inprocess_engine  # noqa: E402

log = logging.getLogger("bench.vllm_first_logprobs")
RESULTS = Path(__file__).parent / "results"


async def child(ops: str) -> dict:
    from saelora.adapters.splice import RowSpec
    from saelora.serve.core.engine import GenerationRequest, Sampling

    _, engine = inprocess_engine(Path(tempfile.mkdtemp()))
    await engine.start()
    try:
        if ops == "vllm":
            from vllm.v1.sample import sampler

            from saelora.serve.vllm_engine import sampler_ops

            sampler.batched_count_greater_than = sampler_ops._ORIG["batched_count_greater_than"]

        async def one(logprobs: int | None) -> float:
            ids = engine.tokenizer.encode("The capital of France is")
            req = GenerationRequest(ids, Sampling(max_tokens=1, temperature=0.0, logprobs=logprobs),
                                    RowSpec(modes={n: "off" for n in engine.sae_names}), None)
            t = time.perf_counter()
            async for _ in engine.generate(req):
                pass
            return time.perf_counter() - t
        await one(None)
        return {"plain_s": round(await one(None), 3), "first_logprobs_s": round(await one(1), 3),
                "second_logprobs_s": round(await one(1), 3)}
    finally:
        await engine.stop()


def run_case(ops: str, cache: Path) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache))
    before = sum(1 for p in cache.rglob("*") if p.is_file())
    r = subprocess.run([sys.executable, __file__, "--child", ops], env=env, capture_output=True, text=True,
                       timeout=900, check=True)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    return {"ops": ops, "cache_files_before": before, **got,
            "cache_files_written": sum(1 for p in cache.rglob("*") if p.is_file()) - before}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", choices=("saelora", "vllm"), help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.child:
        sys.stdout.write(json.dumps(asyncio.run(child(args.child))) + "\n")
        return 0
    cases = []
    for ops in ("saelora", "vllm"):
        cache = Path(tempfile.mkdtemp(prefix="inductor-"))
        for state in ("empty", "warm"):
            cases.append({"inductor_cache": state, **run_case(ops, cache)})
            log.info("%s", cases[-1])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vllm_first_logprobs.json").write_text(json.dumps({"cases": cases}, indent=2) + "\n")
    lines = ["# vLLM engine: the first logprobs request (embedded model, in-process, 1 token)", "",
             "Rerun: `python bench/vllm_first_logprobs.py`.", "",
             "| rank op | inductor cache | plain request s | first logprobs s | second logprobs s | files compiled |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {c['ops']} | {c['inductor_cache']} | {c['plain_s']} | {c['first_logprobs_s']} | "
              f"{c['second_logprobs_s']} | {c['cache_files_written']} |" for c in cases]
    (RESULTS / "vllm_first_logprobs.md").write_text("\n".join(lines) + "\n")
    log.info("\n%s", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
