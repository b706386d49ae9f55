"""Where a vLLM decode step's LoRA time goes, measured inside the engine (no HTTP).

Drives `VllmEngine` in-process: 4 greedy streams of `--tokens` tokens, alternating base requests and requests
through one rank-16 all-linear adapter (`--pairs` pairs, after one warm-up of each). Timers wrap the engine step
and, in saelora's vLLM LoRA ops, `add_lora_linear` (every LoRA projection: 4 calls a layer), `_add_delta` (the
matmuls) and `_fused` (the fused-stack cache lookup). Reported per decode step, medians over the pairs:
step time (base, LoRA), LoRA time in all, its matmuls, and the Python around them (add_lora_linear minus
_add_delta). The timers add ~1 us a call. Writes bench/results/vllm_lora_step[_LABEL].{json,md}.

    python bench/vllm_lora_step.py [--pairs 4] [--label NAME]
To measure other LoRA ops (e.g. an older commit's), put that `serve/vllm_engine/lora_ops.py` in place: the
editable install wins over PYTHONPATH. The timers wrap the functions by name.
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.serve import PROMPTS, make_adapters  # noqa: E402

log = logging.getLogger("bench.vllm_lora_step")
RESULTS = Path(__file__).parent / "results"
TIMED = ("add_lora_linear", "_add_delta", "_fused")


def timers(engine) -> dict[str, float]:  # noqa: ANN001
    """Wrap the engine's step and the LoRA ops' TIMED functions (before the engine installs them)."""
    from saelora.serve.vllm_engine import lora_ops

    acc = dict.fromkeys((*TIMED, "step", "steps"), 0.0)

    def wrap(fn, name):  # noqa: ANN001, ANN202
        def timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                acc[name] += time.perf_counter() - t
        return timed
    for name in TIMED:
        setattr(lora_ops, name, wrap(getattr(lora_ops, name), name))
    step = engine._step

    def timed_step() -> None:
        t = time.perf_counter()
        step()
        acc["step"] += time.perf_counter() - t
        acc["steps"] += 1
    engine._step = timed_step
    return acc


async def one_run(engine, tokenizer, adapter: str | None, tokens: int, acc: dict) -> dict:  # noqa: ANN001
    from saelora.adapters.splice import RowSpec
    from saelora.serve.core.engine import GenerationRequest, Sampling

    async def stream(prompt: str) -> None:
        off = RowSpec(modes={n: "off" for n in engine.sae_names})
        req = GenerationRequest(tokenizer.encode(prompt), Sampling(max_tokens=tokens, temperature=0.0,
                                                                   ignore_eos=True), off, adapter)
        async for _ in engine.generate(req):
            pass
    for k in acc:
        acc[k] = 0.0
    await asyncio.gather(*[stream(p) for p in PROMPTS[:4]])
    n = acc["steps"]
    return {"step_ms": acc["step"] / n * 1e3, "lora_ms": acc["add_lora_linear"] / n * 1e3,
            "matmul_ms": acc["_add_delta"] / n * 1e3, "cache_ms": acc["_fused"] / n * 1e3,
            "python_ms": (acc["add_lora_linear"] - acc["_add_delta"]) / n * 1e3, "steps": n}


def inprocess_engine(root: Path) -> tuple[Any, Any]:
    """(model, VllmEngine) for the embedded model with the shipped SAE and adapters under `root`, built as
    `saelora serve` builds it: under one_thread(), so no OpenMP team starts on this thread. Not started."""
    from saelora.adapters.config import DEFAULT_MODEL
    from saelora.adapters.models import load_model
    from saelora.adapters.saes import load_sae, shipped_sae
    from saelora.adapters.threads import one_thread
    from saelora.serve.config import ServeConfig
    from saelora.serve.vllm_engine.engine import VllmEngine

    with one_thread():
        lm = load_model(DEFAULT_MODEL, device="cpu", weights=False)
        saes = [load_sae(lm.model, str(shipped_sae(DEFAULT_MODEL)), tokenizer=lm.tokenizer)]
        return lm, VllmEngine(lm, saes, ServeConfig(kv_cache_gb=2, adapter_root=str(root)))


async def measure(args: argparse.Namespace, root: Path) -> dict:
    lm, engine = inprocess_engine(root)
    acc = timers(engine)
    await engine.start()
    try:
        await engine.load_adapter("a", "r0")
        runs: dict[str, list[dict]] = {"base": [], "lora": []}
        for i in range(args.pairs + 1):  # the first pair warms up (and fuses the stacks)
            for kind, adapter in (("base", None), ("lora", "a")):
                got = await one_run(engine, lm.tokenizer, adapter, args.tokens, acc)
                if i:
                    runs[kind].append(got)
    finally:
        await engine.stop()
    med = {kind: {k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0]} for kind, rs in runs.items()}
    ratios = [b["step_ms"] / lo["step_ms"] for b, lo in zip(runs["base"], runs["lora"], strict=True)]
    return {"settings": vars(args), "runs": runs, "median": med,
            "lora_vs_base_step": {"per_pair": [round(r, 3) for r in ratios],
                                  "median": round(statistics.median(ratios), 3)}}


def report(res: dict) -> list[str]:
    b, lo = res["median"]["base"], res["median"]["lora"]
    return ["# vLLM decode step, LoRA time inside the engine (4 streams, one rank-16 adapter)", "",
            f"{res['settings']['pairs']} alternating pairs of base / LoRA runs, {res['settings']['tokens']} tokens a "
            "stream; medians per decode step. Rerun: `python bench/vllm_lora_step.py`.", "",
            "| ms per step | base | LoRA |", "|---|---|---|",
            f"| step | {b['step_ms']} | {lo['step_ms']} |",
            f"| add_lora_linear, all | {b['lora_ms']} | {lo['lora_ms']} |",
            f"| of which matmuls (_add_delta) | {b['matmul_ms']} | {lo['matmul_ms']} |",
            f"| of which Python around them | {b['python_ms']} | {lo['python_ms']} |",
            f"| of which the fused-stack cache (_fused) | {b['cache_ms']} | {lo['cache_ms']} |", "",
            f"Base step ÷ LoRA step, per pair: {res['lora_vs_base_step']['per_pair']} "
            f"(median {res['lora_vs_base_step']['median']})."]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=4, help="measured base/LoRA pairs (after one warm-up pair)")
    p.add_argument("--tokens", type=int, default=48, help="tokens per stream")
    p.add_argument("--label", default="", help="suffix of the results files (e.g. the code measured)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from saelora.adapters.config import DEFAULT_MODEL
    from saelora.adapters.saes import shipped_sae
    from saelora.adapters.threads import one_thread

    root = Path(tempfile.mkdtemp(prefix="saelora-bench-"))
    with one_thread():  # no OpenMP team on this thread: a second team beside the engine's slows its small ops ~3x
        make_adapters(root, str(shipped_sae(DEFAULT_MODEL)), 1, rank=16)
    res = asyncio.run(measure(args, root))
    stem = "vllm_lora_step" + (f"_{args.label}" if args.label else "")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(res, indent=2))
    md = report(res)
    (RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")
    log.info("\n%s", "\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
