"""Where the idle SAE cost came from: plain requests (no `sae` field) in one process.

(a) A/B in one process: a torch engine with the SAE spliced and one without, run alternately (4 streams of 48
    greedy tokens each, `--reps` times); the splice's own cost on requests that do not use it.
(b) The cause (adapters/threads.py): one engine without an SAE, timed before and after loading the SAE on the
    main thread, first inside `one_thread()` (as `saelora serve` does now), then outside it (as it did). The SAE
    is stored in fp16: loading it runs a parallel conversion on the main thread, which then owns a second
    OpenMP team, and the engine thread's matmuls slow down for good.
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
    from saelora.adapters.splice import RowSpec
    from saelora.serve.core.engine import GenerationRequest, Sampling

    async def one(p: str) -> None:
        req = GenerationRequest(tokenizer(p)["input_ids"], Sampling(max_tokens=48, temperature=0.0), RowSpec())
        async for _ in engine.generate(req):
            pass
    t0 = time.perf_counter()
    await asyncio.gather(*[one(p) for p in PROMPTS])
    return time.perf_counter() - t0


async def measure(reps: int) -> dict:
    from sae_lens import SAE

    from saelora.adapters.models import load_model
    from saelora.adapters.saes import load_sae, shipped_sae
    from saelora.adapters.threads import one_thread
    from saelora.serve.torch_engine import TorchEngine

    path = str(shipped_sae(DEFAULT_MODEL))
    with one_thread():  # as `saelora serve` starts
        lm_bare, lm = load_model(DEFAULT_MODEL, device="cpu"), load_model(DEFAULT_MODEL, device="cpu")
        bare = TorchEngine(lm_bare, [])
        spliced = TorchEngine(lm, [load_sae(lm.model, path, tokenizer=lm.tokenizer)])
    await bare.start()
    await spliced.start()
    await _run(bare, lm_bare.tokenizer)
    with_sae, without = [], []
    for _ in range(reps):
        with_sae.append(await _run(spliced, lm.tokenizer))
        without.append(await _run(bare, lm_bare.tokenizer))
    await spliced.stop()
    before = [await _run(bare, lm_bare.tokenizer) for _ in range(reps)]
    with one_thread():
        SAE.load_from_disk(path, device="cpu", dtype="float32")
    guarded = [await _run(bare, lm_bare.tokenizer) for _ in range(reps)]
    SAE.load_from_disk(path, device="cpu", dtype="float32")  # the fp16 -> fp32 conversion on this thread
    unguarded = [await _run(bare, lm_bare.tokenizer) for _ in range(reps)]
    await bare.stop()
    med, r3 = statistics.median, (lambda xs: [round(x, 3) for x in xs])
    return {"in_process_ab": {"s_with_sae": r3(with_sae), "s_without": r3(without),
                              "ratio": round(med(with_sae) / med(without), 3)},
            "sae_loaded_on_main_thread": {
                "s_before": r3(before), "s_after_inside_one_thread": r3(guarded), "s_after_outside": r3(unguarded),
                "ratio_inside_one_thread": round(med(guarded) / med(before), 3),
                "ratio_outside": round(med(unguarded) / med(before), 3)}}


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
