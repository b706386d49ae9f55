"""saelora's vLLM engine against the vLLM a user would run instead, on the same model, cores and load.

Unmodified vLLM is `python -m vllm.entrypoints.openai.api_server` (its defaults; saelora installs nothing into
vLLM outside its own engine, decision 57). Both get the same CPU settings (both cores bound, none reserved, the
same KV cache), float32 and 8 sequences a batch. Two pairs, each side by side in one run: both servers up,
measurements interleaved, the order alternating per repetition, a warm-up first.

- **base**: `saelora serve --engine vllm --max-loras 0` (vLLM compiles the model around the splice op) against
  unmodified vLLM. saelora arms: no SAE requested; top-8 latents on every token (`error_term`, so the tokens are
  the base model's); an edit (a latent set on every generated token).
- **lora**: saelora with the demo adapter (`--adapter demo=...`) against vLLM `--enable-lora` serving the same
  adapter, both asked for model `demo`. On CPU vLLM runs every LoRA-enabled model eagerly (its own rule).

Load: 1, 4 and 8 concurrent streams of `--tokens` greedy tokens with `ignore_eos`, over HTTP. Ratios are of
tokens/s, saelora over vLLM, per repetition (the two measured next to each other); the median and the range of
the repetitions are reported. Targets at 8 streams (issue 30): no SAE >= 0.95, latents >= 0.90, edit >= 0.90,
demo LoRA >= 0.85.

    python bench/vs_vllm.py [--reps 3] [--tokens 64] [--pairs base,lora]

Writes bench/results/vs_vllm.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve import PROMPTS, RESULTS  # noqa: E402

log = logging.getLogger("bench.vs_vllm")
STREAMS = (1, 4, 8)
TARGETS = {"no_sae": 0.95, "latents": 0.90, "edit": 0.90, "demo_lora": 0.85}
CORES = ",".join(map(str, sorted(os.sched_getaffinity(0))))
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": CORES, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
ARMS = {  # saelora arm -> the `sae` extension it sends (None: a plain OpenAI request)
    "no_sae": None,
    "latents": {"mode": "error_term", "features": {"top_k": 8}},
    "edit": {"mode": "error_term", "edits": [{"feature": 7, "op": "set", "value": 4.0, "positions": "generated"}]},
}


@contextlib.contextmanager
def process(cmd: list[str], env: dict[str, str], port: int, log_path: Path, timeout: float = 600) -> Iterator[str]:
    """A server subprocess, healthy; yields its URL."""
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd + ["--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1", **env))
        try:
            deadline = time.time() + timeout
            while True:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"{cmd[:4]} did not come up; log: {log_path}\n{log_path.read_text()[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                time.sleep(1)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def vllm_cmd(model: Path, adapter: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--dtype", "float32",
           "--max-num-seqs", "8", "--seed", "0", "--served-model-name", "base", "--disable-log-stats"]
    if adapter:
        cmd += ["--enable-lora", "--max-loras", "4", "--max-lora-rank", "64", "--lora-modules", f"demo={adapter}"]
    return cmd


def saelora_cmd(sae: Path, adapter: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "saelora", "serve", "--engine", "vllm", "--sae", str(sae), "--max-batch", "8",
           "--kv-cache-gb", "2", "--served-model-name", "base"]
    return cmd + (["--adapter", f"demo={adapter}"] if adapter else ["--max-loras", "0"])


async def _load(url: str, streams: int, tokens: int, model: str, sae: dict | None) -> float:
    """tokens/s of `streams` concurrent greedy completions of `tokens` tokens each."""
    bodies = [{"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens, "temperature": 0,
               "ignore_eos": True, **({"sae": sae} if sae else {})} for i in range(streams)]
    async with httpx.AsyncClient(timeout=600) as c:
        t0 = time.perf_counter()
        rs = await asyncio.gather(*[c.post(url + "/v1/completions", json=b) for b in bodies])
        dt = time.perf_counter() - t0
    for r in rs:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: {r.status_code} {r.text[:300]}")
    n = sum(r.json()["usage"]["completion_tokens"] for r in rs)
    if n != streams * tokens:
        raise RuntimeError(f"{url}: {n} tokens, expected {streams * tokens}")
    return n / dt


def measure_pair(refs: dict[str, str], saelora_url: str, arms: dict[str, dict | None], model: str, tokens: int,
                 reps: int) -> dict[str, dict[int, list[float]]]:
    """tok/s per server arm and stream count, interleaved; `refs` are the unmodified vLLM servers."""
    runs = {**{r: (url, None) for r, url in refs.items()}, **{a: (saelora_url, sae) for a, sae in arms.items()}}
    for url, sae in runs.values():  # warm-up (compiles, first-request paths), not counted
        asyncio.run(_load(url, 8, tokens, model, sae))
    out: dict[str, dict[int, list[float]]] = {a: {s: [] for s in STREAMS} for a in runs}
    for rep in range(reps):
        order = list(runs) if rep % 2 == 0 else list(runs)[::-1]
        for s in STREAMS:
            for arm in order:
                url, sae = runs[arm]
                out[arm][s].append(asyncio.run(_load(url, s, tokens, model, sae)))
        log.info("rep %d at 8 streams: %s", rep, {a: round(v[8][-1], 1) for a, v in out.items()})
    return out


def ratios(raw: dict[str, dict[int, list[float]]], ref: str) -> dict[str, dict[str, dict]]:
    """saelora arm / reference `ref`, per repetition, per stream count: median and [min, max]."""
    res = {}
    for arm, by_s in raw.items():
        if arm.startswith("vllm"):
            continue
        res[arm] = {}
        for s, vals in by_s.items():
            per = [a / b for a, b in zip(vals, raw[ref][s], strict=True)]
            res[arm][str(s)] = {"ratio": round(statistics.median(per), 3), "range": [round(min(per), 3),
                                                                                  round(max(per), 3)],
                                "tok_s": round(statistics.median(vals), 1),
                                "vllm_tok_s": round(statistics.median(raw[ref][s]), 1)}
    return res


def run_pair(name: str, args: argparse.Namespace, logs: Path) -> dict:
    """The servers of one pair up, measured, down: unmodified vLLM as a user runs it (`vllm`: the API server and
    its engine core in two processes) and in one process as saelora runs it (`vllm_inproc`: the same engine
    layout, so the ratio to it isolates what saelora adds), and saelora."""
    adapter = args.adapter if name == "lora" else None
    arms = {"demo_lora": None} if adapter else ARMS
    t0 = time.perf_counter()
    inproc = dict(CPU_ENV, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    with process(vllm_cmd(args.model, adapter), CPU_ENV, 8791, logs / f"vllm_{name}.log") as v_url, \
            process(vllm_cmd(args.model, adapter), inproc, 8793, logs / f"vllm_inproc_{name}.log") as i_url, \
            process(saelora_cmd(args.sae, adapter), {}, 8792, logs / f"saelora_{name}.log") as s_url:
        raw = measure_pair({"vllm": v_url, "vllm_inproc": i_url}, s_url, arms, "demo" if adapter else "base",
                           args.tokens, args.reps)
    return {"raw": raw, "ratios": ratios(raw, "vllm"), "ratios_inproc": ratios(raw, "vllm_inproc"),
            "seconds": round(time.perf_counter() - t0, 1)}


def report(res: dict) -> list[str]:
    st = res["settings"]
    lines = ["# saelora's vLLM engine vs unmodified vLLM (SmolLM2-135M, float32, 2 CPU cores)", "",
             f"{st['tokens']} greedy tokens per stream with `ignore_eos`; {st['reps']} interleaved repetitions after "
             "a warm-up; ratio = saelora tok/s / vLLM tok/s per repetition, median [range]. Same cores, KV cache "
             "and batch size for all. `vLLM`: `python -m vllm.entrypoints.openai.api_server` as a user runs it (API "
             "server and engine core in two processes); `vLLM in-process`: the same with "
             "`VLLM_ENABLE_V1_MULTIPROCESSING=0`, saelora's layout, so that ratio is what saelora itself costs. "
             "Rerun: `python bench/vs_vllm.py`.", "",
             "| pair | saelora arm | streams | saelora tok/s | vLLM tok/s | ratio | vLLM in-process tok/s | ratio | "
             "target (8 streams, vs vLLM) |", "|---|---|---|---|---|---|---|---|---|"]
    for pair, r in res["pairs"].items():
        for arm, by_s in r["ratios"].items():
            for s, v in by_s.items():
                w = r["ratios_inproc"][arm][s]
                tgt = f">= {TARGETS[arm]}" + (" met" if v["ratio"] >= TARGETS[arm] else " **missed**") \
                    if s == "8" else ""
                lines.append(f"| {pair} | {arm} | {s} | {v['tok_s']} | {v['vllm_tok_s']} | {v['ratio']} "
                             f"[{v['range'][0]}, {v['range'][1]}] | {w['vllm_tok_s']} | {w['ratio']} "
                             f"[{w['range'][0]}, {w['range'][1]}] | {tgt} |")
    return lines


def main() -> int:
    from saelora.adapters.config import cache_dir, demo_dir

    demo = demo_dir("smollm2-135m")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=cache_dir() / "models" / "smollm2-135m")
    p.add_argument("--sae", type=Path, default=demo / "sae")
    p.add_argument("--adapter", type=Path, default=demo / "adapter")
    p.add_argument("--pairs", default="base,lora")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--logs", type=Path, default=Path("/tmp/saelora-vs-vllm"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args.logs.mkdir(parents=True, exist_ok=True)
    res = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "pairs": {}}
    for pair in args.pairs.split(","):
        res["pairs"][pair] = run_pair(pair, args, args.logs)
        log.info("%s: %s", pair, {a: v["8"]["ratio"] for a, v in res["pairs"][pair]["ratios"].items()})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vs_vllm.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = report(res)
    (RESULTS / "vs_vllm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
