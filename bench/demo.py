"""Time `saelora demo` cold (empty cache: dequantise the model, pack the corpus, describe the shipped SAE's
features, train the adapter) and warm (everything reused), in a fresh $SAELORA_CACHE. Targets on 2 cores: cold
≤ 12 min, so that `make demo` on a fresh machine (about 3 min of `make setup` before it) stays ≤ 15 min; warm
≤ 2 min.
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

RESULTS = Path(__file__).parent / "results"


def run_demo(cache: Path, model: str | None = None) -> tuple[float, str]:
    """Run `saelora demo [--model M]` with $SAELORA_CACHE=cache; returns (seconds, its report)."""
    t0 = time.perf_counter()
    extra = ["--model", model] if model else []
    r = subprocess.run([sys.executable, "-m", "saelora", "demo", *extra], capture_output=True, text=True,
                       env=dict(os.environ, SAELORA_CACHE=str(cache)))
    if r.returncode != 0:
        raise SystemExit(f"demo failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0, r.stdout


def main() -> int:
    cache = Path(tempfile.mkdtemp(prefix="saelora-demo-bench-"))
    cold, report = run_demo(cache)
    warm, _ = run_demo(cache)
    gap = re.search(r"closes ([\d.]+)% of the SAE's CE gap", report)
    res = {"cold_s": round(cold, 1), "warm_s": round(warm, 1), "targets": {"cold_s_max": 720, "warm_s_max": 120},
           "adapter_gap_closed_pct": float(gap.group(1)) if gap else None, "report": report}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "demo.json").write_text(json.dumps(res, indent=2))
    md = ["# demo timing (2 CPU cores, fresh cache)", "", "| run | seconds | target |", "|---|---|---|",
          f"| cold (first run) | {res['cold_s']} | ≤ 720 |", f"| warm (later run) | {res['warm_s']} | ≤ 120 |", "",
          "Report of the cold run:", "", "```", report.strip(), "```"]
    (RESULTS / "demo.md").write_text("\n".join(md) + "\n")
    print("\n".join(md[:6]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
