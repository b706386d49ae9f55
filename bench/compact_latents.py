"""Bytes and server time per token of the two latents forms, side by side in one run: `"features": {"top_k":
K, "include_prompt": true}` in the full form (one JSON object per token and SAE) and in the compact form
(saelora.clients.compact: base64 arrays, float16 values), on the torch engine with the embedded SmolLM2 and its
shipped SAE.

Each repetition sends the same 4 prompts (48 generated tokens each, greedy) once per form, the order alternating;
bytes are the response bodies' (non-streamed), per token with latents (prompt + generated); time is the
request's wall time per generated token (the server's generation included, so the difference is what the form
costs on top). Also the client-side decode time of the compact form.

    python bench/compact_latents.py [--top-k 32] [--reps 3]     # writes bench/results/serve_compact.{json,md}
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve import PROMPTS, RESULTS, server  # noqa: E402

log = logging.getLogger("bench.compact_latents")


def one(url: str, fmt: str, top_k: int, tokens: int) -> dict:
    from saelora.clients import protocol as P

    size = secs = latent_tokens = generated = decode_s = 0.0
    for prompt in PROMPTS[:4]:
        body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
                "sae": {"features": {"top_k": top_k, "include_prompt": True, "format": fmt}}}
        t = time.perf_counter()
        r = httpx.post(url + "/v1/completions", json=body, timeout=600)
        secs += time.perf_counter() - t
        r.raise_for_status()
        size += len(r.content)
        choice = r.json()["choices"][0]
        t = time.perf_counter()
        p, g = P.ChoiceFeatures(**choice["features"]).tokens()
        decode_s += time.perf_counter() - t
        latent_tokens += len(p or []) + len(g)
        generated += r.json()["usage"]["completion_tokens"]
    return {"bytes_per_token": size / latent_tokens, "ms_per_generated_token": 1000 * secs / generated,
            "client_decode_ms_per_token": 1000 * decode_s / latent_tokens}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tokens", type=int, default=48)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from saelora.adapters.saes import shipped_sae

    srv = server(str(shipped_sae("smollm2-135m")), Path(tempfile.mkdtemp()), 8791)
    runs: dict[str, list[dict]] = {"full": [], "compact": []}
    try:
        one(srv.url, "full", args.top_k, 4)  # warm-up
        for rep in range(args.reps):
            for fmt in (("full", "compact") if rep % 2 == 0 else ("compact", "full")):
                runs[fmt].append(one(srv.url, fmt, args.top_k, args.tokens))
            log.info("rep %d: %s", rep, {k: round(v[-1]["bytes_per_token"]) for k, v in runs.items()})
    finally:
        srv.close()
    med = {fmt: {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]} for fmt, rs in runs.items()}
    full, compact = med["full"], med["compact"]
    res = {"engine": "torch", "model": "smollm2-135m", "top_k": args.top_k, "tokens": args.tokens, "reps": args.reps,
           "median": med, "runs": runs,
           "ratio_bytes_full_over_compact": round(full["bytes_per_token"] / compact["bytes_per_token"], 2),
           "ratio_time_compact_over_full": round(med["compact"]["ms_per_generated_token"]
                                                 / med["full"]["ms_per_generated_token"], 3)}
    (RESULTS / "serve_compact.json").write_text(json.dumps(res, indent=1))
    lines = [f"# Latents on the wire: full vs compact (torch engine, SmolLM2-135M, shipped SAE, top-{args.top_k})", "",
             f"4 prompts x {args.tokens} generated tokens, prompt latents included; medians of {args.reps} interleaved "
             "repetitions. Rerun: `python bench/compact_latents.py`.", "",
             "| form | bytes / token | ms / generated token (request) | client decode ms / token |",
             "|---|---|---|---|"]
    lines += [f"| {fmt} | {m['bytes_per_token']:.0f} | {m['ms_per_generated_token']:.1f} | "
              f"{m['client_decode_ms_per_token']:.3f} |" for fmt, m in med.items()]
    lines += ["", f"Full / compact bytes: **{res['ratio_bytes_full_over_compact']}x** (target >= 4x at top-32); "
              f"compact / full request time: {res['ratio_time_compact_over_full']}."]
    (RESULTS / "serve_compact.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
