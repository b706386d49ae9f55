"""bench/train_gap.py --quick on the tiny model: the whole study pipeline runs and writes its results (CI tier)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tiny import tiny_workspace

ROOT = Path(__file__).resolve().parents[2]


def test_train_gap_quick_writes_every_arm_and_the_from_scratch_comparison(tmp_path):
    ws = tiny_workspace(tmp_path, d_model=32)
    env = dict(os.environ, SAELORA_CACHE=str(tmp_path / "cache"), SAELORA_DEVICE="cpu")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "train_gap.py"), "--quick", "--model", ws["model"],
                        "--sae", ws["saes"][0], "--corpus", ws["corpus"], "--out", str(tmp_path / "out")],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "train_gap_quick.json").read_text())
    assert set(res["arms"]) == {"lora_all", "lora_after", "sae_kl"}
    for arm in res["arms"].values():
        chosen = [x for x in arm["runs"] if x.get("chosen")]
        assert [x["seed"] for x in chosen] == [0, 1] and len({x["lr"] for x in chosen}) == 1
        assert len(arm["gap_closed_seeds"]) == 2
    assert res["settings"]["eval_tokens"] >= 256 and res["ce_spliced"] != res["ce_base"]
    scratch = next(k for k in res if "from_scratch" in k)
    assert "speedup" in res[scratch] and res[scratch]["test_ce"]["e2e"] > 0
    md = (tmp_path / "out" / "train_gap_quick.md").read_text()
    assert "What differs from the paper" in md and (tmp_path / "out" / "train_gap_quick.png").stat().st_size > 0
