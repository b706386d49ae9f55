"""The embedded models' one-time dequantisation (GGUF -> fp32 folder), with transformers opening the GGUF three
times as it does by itself, and with saelora's one shared reader (`_one_gguf_reader`, decision 70), side by side
in one run on empty caches; and whether the two folders are byte-identical.

    python bench/dequant.py        # ~2 min on 2 cores; writes bench/results/dequant.json
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("bench.dequant")


def _time(name: str, cache: Path, one_reader: bool) -> float:
    from saelora.adapters import models

    os.environ["SAELORA_CACHE"] = str(cache)
    models.embedded_gguf_path(name)  # Gemma's chunks assembled first: not part of the dequantisation
    saved = models._one_gguf_reader
    if not one_reader:
        models._one_gguf_reader = contextlib.nullcontext
    try:
        t0 = time.perf_counter()
        models.embedded_model_dir(name)
        return time.perf_counter() - t0
    finally:
        models._one_gguf_reader = saved


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("smollm2-135m", "gemma3-270m"):
            three, one = Path(tmp) / f"{name}-three", Path(tmp) / f"{name}-one"
            s_three, s_one = _time(name, three, False), _time(name, one, True)
            a, b = three / "models" / name, one / "models" / name
            files = sorted(p.name for p in a.iterdir() if p.name != "saelora_source.json")
            same = all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)
            out[name] = {"three_readers_s": round(s_three, 1), "one_reader_s": round(s_one, 1),
                         "speedup": round(s_three / s_one, 2), "files_identical": same, "files": files}
            log.info("%s: %.1f s -> %.1f s, folders identical: %s", name, s_three, s_one, same)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dequant.json").write_text(json.dumps(out, indent=1))
    return 0 if all(v["files_identical"] for v in out.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
