"""A serve figure of two checkouts side by side in one run: this working tree against an older commit, both
servers up, measurements interleaved (A off, A on, B off, B on, ... with the order alternating per repetition).

Written to settle whether a change moved `features_on_off` (latents on, 4 streams, vs the splice off), the
figure bench/serve.py measures, without comparing runs taken hours apart on a shared machine.

The older commit is checked out with `git worktree` and imported through PYTHONPATH (ahead of the editable
install); where its pyproject declares the `vllm.general_plugins` entry point (saelora before issue 28), a
minimal dist-info beside it declares it again, so its vLLM engine registers its model classes as it did.

    python bench/serve_ab.py --base bd50442 [--engine vllm] [--reps 6] [--tokens 48]

Writes bench/results/serve_ab_<engine>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve import RESULTS, _bodies, _run, server  # noqa: E402

log = logging.getLogger("bench.serve_ab")
REPO = Path(__file__).resolve().parent.parent
PLUGIN = '[vllm.general_plugins]\nsaelora = saelora.serve.vllm_engine:register\n'


def checkout(rev: str, tmp: Path) -> dict[str, str]:
    """A worktree of `rev` laid out as the `saelora` package (its pyproject's package-dir, by symlinks); the
    environment that makes a server import it."""
    import tomllib

    tree, path = tmp / "tree", tmp / "path"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev], check=True,
                   capture_output=True)
    pyproject = tomllib.loads((tree / "pyproject.toml").read_text())
    dirs = pyproject["tool"]["setuptools"]["package-dir"]
    root = path / "saelora"
    root.mkdir(parents=True)
    for entry in (tree / dirs["saelora"]).iterdir():
        (root / entry.name).symlink_to(entry)
    for pkg, folder in dirs.items():
        if pkg.count(".") == 1:
            (root / pkg.split(".")[1]).symlink_to(tree / folder)
    if "vllm.general_plugins" in pyproject["project"].get("entry-points", {}):
        info = path / "saelora_ab_base-0.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: saelora-ab-base\nVersion: 0.0\n")
        (info / "entry_points.txt").write_text(PLUGIN)
    return {"PYTHONPATH": os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def tok_s(url: str, tokens: int, sae: dict) -> float:
    dt, n, fails = asyncio.run(_run(url, _bodies(4, tokens, sae=sae)))
    if fails:
        raise RuntimeError(f"{fails} requests failed at {url}")
    return n / dt


def measure(urls: dict[str, str], tokens: int, reps: int) -> dict[str, dict[str, list[float]]]:
    """tok/s with the splice off and with latents on, per server, interleaved; the server order alternates."""
    off, on = {"mode": "off"}, {"mode": "error_term", "features": {"top_k": 8}}
    out = {k: {"off": [], "on": []} for k in urls}
    for url in urls.values():  # warm-up, not counted
        tok_s(url, tokens, off), tok_s(url, tokens, on)
    for rep in range(reps):
        order = list(urls) if rep % 2 == 0 else list(urls)[::-1]
        for name in order:
            out[name]["off"].append(tok_s(urls[name], tokens, off))
            out[name]["on"].append(tok_s(urls[name], tokens, on))
        log.info("rep %d: %s", rep, {k: round(v["on"][-1] / v["off"][-1], 3) for k, v in out.items()})
    return out


def summary(raw: dict[str, dict[str, list[float]]]) -> dict[str, dict]:
    res = {}
    for name, v in raw.items():
        ratios = [a / b for a, b in zip(v["on"], v["off"], strict=True)]
        off, on = statistics.median(v["off"]), statistics.median(v["on"])
        res[name] = {"tok_s_off": round(off, 1), "tok_s_on": round(on, 1), "features_on_off": round(on / off, 3),
                     "per_rep": [round(r, 3) for r in ratios], "spread": [round(min(ratios), 3), round(max(ratios), 3)]}
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the older commit (B) to compare this working tree (A) with")
    p.add_argument("--engine", choices=("torch", "vllm"), default="vllm")
    p.add_argument("--reps", type=int, default=6, help="interleaved repetitions")
    p.add_argument("--tokens", type=int, default=48, help="tokens per request")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from saelora.adapters.saes import shipped_sae

    sae, tmp = str(shipped_sae("smollm2-135m")), Path(tempfile.mkdtemp(prefix="saelora-ab-"))
    base = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.base], check=True,
                          capture_output=True, text=True).stdout.strip()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    env = checkout(args.base, tmp / "base")
    servers = {f"head {head}": server(sae, tmp, 8781, args.engine), f"base {base}": server(sae, tmp, 8782, args.engine,
                                                                                              env=env)}
    try:
        raw = measure({k: s.url for k, s in servers.items()}, args.tokens, args.reps)
    finally:
        for s in servers.values():
            s.close()
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tmp / "base" / "tree")])
    res = {"engine": args.engine, "tokens": args.tokens, "reps": args.reps, "streams": 4, "sae": Path(sae).name,
           "servers": summary(raw), "raw": raw}
    out = RESULTS / f"serve_ab_{args.engine}"
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    lines = [f"# features_on_off, two checkouts side by side ({args.engine} engine, SmolLM2-135M, 2 CPU cores)", "",
             f"4 streams x {args.tokens} tokens, greedy; {args.reps} interleaved repetitions after a warm-up, the "
             f"server order alternating. Rerun: `python bench/serve_ab.py --base {args.base} --engine {args.engine}`.",
             "", "| checkout | tok/s off | tok/s latents on | features_on_off (medians) | per repetition |",
             "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['tok_s_off']} | {v['tok_s_on']} | **{v['features_on_off']}** | "
              f"{', '.join(map(str, v['per_rep']))} |" for k, v in res["servers"].items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
