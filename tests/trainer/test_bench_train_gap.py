"""bench/train_gap.py --quick on the tiny model: the whole study pipeline runs and writes its results (CI tier)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tiny import tiny_workspace

ROOT = Path(__file__).resolve().parents[2]


def test_train_gap_quick_runs_the_v2_protocol_and_the_from_scratch_comparison(tmp_path):
    ws = tiny_workspace(tmp_path, d_model=32)
    env = dict(os.environ, SAELORA_CACHE=str(tmp_path / "cache"), SAELORA_DEVICE="cpu")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "train_gap.py"), "--quick", "--model", ws["model"],
                        "--sae", ws["saes"][0], "--corpus", ws["corpus"], "--out", str(tmp_path / "out"),
                        "--stages", "grid", "seeds", "test", "scratch"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    res = json.loads((out / "train_gap_quick.json").read_text())
    arms = {"lora_all", "lora_after", "sae_kl", "sae_kl_mse"}
    assert set(res["arms"]) == arms == set(res["test"]["arms"])
    assert res["mse_weight"] > 0
    for name, arm in res["arms"].items():
        # the grid brackets the choice: one point was added beyond an edge when the best sat there
        lrs = [r["lr"] for r in arm["grid"]]
        assert lrs == sorted(lrs) and len(lrs) in (2, 3) and arm["lr"] in lrs
        assert [r["seed"] for r in arm["chosen"]] == [0, 1] and {r["lr"] for r in arm["chosen"]} == {arm["lr"]}
        test = res["test"]["arms"][name]
        for convention in ("saelora", "saelens"):
            lo, hi = test[convention]["mean"]["gap_closed_ci"]
            assert lo <= hi and len(test[convention]["per_seed"]) == 2
        assert (test["drift"] is None) == name.startswith("sae_")
    # the choices were frozen before the test band was read; every run is recorded
    choices = json.loads((out / "train_gap_quick_choices.json").read_text())["choices"]
    assert {a: c["lr"] for a, c in choices.items()} == {a: res["arms"][a]["lr"] for a in arms}
    runs = json.loads((out / "train_gap_quick_runs.json").read_text())
    assert {r["arm"] for r in runs} >= arms | {"scratch_lora", "e2e_scratch"}
    t = res["test"]
    assert t["tokens"] >= 64 and t["ce_spliced"]["saelora"] != t["ce_base"]
    # the paper's time comparison: TopK checkpoints + LoRA against e2e at every budget, speed-up per e2e level
    sc = res["from_scratch"]
    assert [t["fraction"] for t in sc["topk"]] == [0.5, 1.0] and [b["steps"] for b in sc["e2e"]] == [2, 4]
    assert sc["topk"][0]["seconds"] < sc["topk"][1]["seconds"] and sc["topk"][0]["steps"] < sc["topk"][1]["steps"]
    for b in sc["e2e"]:  # each budget's rate grid is bracketed like the arms': the best of 2 sits at an edge,
        lrs = [r["lr"] for r in b["runs"]]  # so one point was added beyond it
        assert lrs == sorted(lrs) and len(lrs) == 3 and b["at_edge"] == (b["lr"] in (lrs[0], lrs[-1]))
    assert len(sc["speedups"]) == 2 and all(t["test_ce"]["lora"] > 0 for t in sc["topk"])
    for t in sc["topk"]:  # the LoRA curve starts where the SAE's training stopped, and evals along the run
        assert t["curve"][0][0] >= t["seconds"] and len(t["curve"]) >= 3
    md = (tmp_path / "out" / "train_gap_quick.md").read_text()
    assert "What differs from the paper" in md and f"- Model: {ws['model']} on" in md
    assert res["command"].startswith("python bench/train_gap.py --quick") and res["command"] in md
    assert (tmp_path / "out" / "train_gap_quick.png").stat().st_size > 0
