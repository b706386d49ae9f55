"""Where the idle SAE cost comes from: plain requests (no `sae` field) in one process.

(a) A/B in one process: a torch engine with the SAE spliced and one without, run alternately (4 streams of 48
    greedy tokens each, `--reps` times); the splice's own cost on requests that do not use it.
(b) One engine without an SAE, timed before and after `sae_lens.SAE.load_from_disk` of the same SAE in the
    process (the SAE is loaded, never spliced): the cost of having loaded it.
Writes bench/results/idle_sae.json. `bench/serve.py` measures idle_sae across two server processes.

    python bench/idle_sae.py [--reps 4]
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

from saelora.adapters.config import DEFAULT_MODEL

RESULTS = Path(__file__).parent / "results"
PROMPTS = ["The history of the Roman Empire", "In mathematics, a prime number", "The river flows through the city of",
           "Photosynthesis is the process by which"]
log = logging.getLogger("bench.idle_sae")


async def _run(engine, tokenizer) -> float:  # noqa: ANN001
    from saelora.serve.core.engine import GenerationRequest, Sampling, SpliceRequest

    async def one(p: str) -> None:
        req = GenerationRequest(tokenizer(p)["input_ids"], Sampling(max_tokens=48, temperature=0.0), SpliceRequest())
        async for _ in engine.generate(req):
            pass
    t0 = time.perf_counter()
    await asyncio.gather(*[one(p) for p in PROMPTS])
    return time.perf_counter() - t0


async def measure(reps: int) -> dict:
    from sae_lens import SAE

    from saelora.adapters.models import load_model
    from saelora.adapters.saes import load_sae, shipped_sae
    from saelora.serve.torch_engine import TorchEngine

    path = str(shipped_sae(DEFAULT_MODEL))
    lm_bare = load_model(DEFAULT_MODEL, device="cpu")
    bare = TorchEngine(lm_bare, [])
    await bare.start()
    await _run(bare, lm_bare.tokenizer)
    before = [await _run(bare, lm_bare.tokenizer) for _ in range(reps)]
    kept = SAE.load_from_disk(path, device="cpu", dtype="float32")  # loaded, never spliced
    after = [await _run(bare, lm_bare.tokenizer) for _ in range(reps)]
    lm = load_model(DEFAULT_MODEL, device="cpu")
    spliced = TorchEngine(lm, [load_sae(lm.model, path, tokenizer=lm.tokenizer)])
    await spliced.start()
    with_sae, without = [], []
    for _ in range(reps):
        with_sae.append(await _run(spliced, lm.tokenizer))
        without.append(await _run(bare, lm_bare.tokenizer))
    await spliced.stop()
    await bare.stop()
    del kept
    med, r3 = statistics.median, (lambda xs: [round(x, 3) for x in xs])
    return {"in_process_ab": {"s_with_sae": r3(with_sae), "s_without": r3(without),
                              "ratio": round(med(with_sae) / med(without), 3)},
            "after_loading_an_sae": {"s_before": r3(before), "s_after": r3(after),
                                     "ratio": round(med(after) / med(before), 3)}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=4)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    res = asyncio.run(measure(args.reps))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "idle_sae.json").write_text(json.dumps(res, indent=2))
    log.info("%s", json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
