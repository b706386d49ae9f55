"""Where a vLLM hot load's time goes, measured inside the engine (no HTTP, no other requests).

Drives `VllmEngine` in-process: `--cycles` load/unload cycles of one rank-16 all-linear adapter of the embedded
model (the bench/serve.py adapter), timers around the registry's parts of a load (`validate_bundle` on the
original, `private_copy` into the content-addressed store, `load_bundle` of the copy) and vLLM's `add_lora`.
Medians over the cycles after the first three. bench/serve.py's hot_load_s is this plus HTTP and the wait for
a step boundary under two streams of load. Writes bench/results/vllm_hot_load.{json,md}.

    python bench/vllm_hot_load.py [--cycles 15]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.serve import make_adapters  # noqa: E402
from bench.vllm_lora_step import inprocess_engine  # noqa: E402

log = logging.getLogger("bench.vllm_hot_load")
RESULTS = Path(__file__).parent / "results"
PARTS = ("validate_bundle", "private_copy", "load_bundle")


def timed(fn: Callable, key: str, acc: dict[str, list[float]]) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc.setdefault(key, []).append(time.perf_counter() - t)
    return wrapper


async def cycles(engine: Any, n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"load": [], "unload": []}
    await engine.start()
    try:
        for i in range(n):
            t = time.perf_counter()
            await engine.load_adapter(f"h{i}", "r0")
            out["load"].append(time.perf_counter() - t)
            t = time.perf_counter()
            await engine.unload_adapter(f"h{i}")
            out["unload"].append(time.perf_counter() - t)
    finally:
        await engine.stop()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cycles", type=int, default=15, help="load/unload cycles (the first three are warm-up)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from saelora.adapters.config import DEFAULT_MODEL
    from saelora.adapters.saes import shipped_sae
    from saelora.adapters.threads import one_thread
    from saelora.serve.core import registry

    acc: dict[str, list[float]] = {}
    for name in PARTS:
        setattr(registry, name, timed(getattr(registry, name), name, acc))
    root = Path(tempfile.mkdtemp(prefix="saelora-bench-"))
    with one_thread():  # no OpenMP team on this thread, as in `saelora serve`
        make_adapters(root, str(shipped_sae(DEFAULT_MODEL)), 1, rank=16)
    _, engine = inprocess_engine(root)
    engine._add_lora = timed(engine._add_lora, "vllm_add_lora", acc)
    acc.update(asyncio.run(cycles(engine, args.cycles)))
    size = (root / "r0" / "adapter_model.safetensors").stat().st_size
    med = {k: round(statistics.median(v[3:]) * 1e3, 1) for k, v in acc.items()}
    res = {"settings": vars(args), "adapter_bytes": size, "median_ms": med,
           "all_ms": {k: [round(x * 1e3, 1) for x in v] for k, v in acc.items()}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vllm_hot_load.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = ["# vLLM hot load inside the engine (no HTTP, idle engine)", "",
             f"Rank-16 all-linear adapter, {size / 1e6:.1f} MB; medians of cycles 4-{args.cycles}. "
             "Rerun: `python bench/vllm_hot_load.py`.", "", "| part | ms |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in med.items()]
    (RESULTS / "vllm_hot_load.md").write_text("\n".join(lines) + "\n")
    log.info("\n%s", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
