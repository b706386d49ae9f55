"""`saelora export --merge ADAPTER OUT` (trainer/export.py): the merged checkpoint is a plain HF model whose
logits equal PEFT's adapted model's; it records where it came from; it refuses a bundle of another model and a
folder that already holds files."""

import json
import subprocess
import sys

import pytest
import torch

from tiny import make_bundle, tiny_workspace


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    ws = tiny_workspace(root)
    ws["a1"] = str(make_bundle(ws, root / "a1", seed=1))
    return ws


def test_the_merged_checkpoint_is_a_plain_model_with_the_adapters_logits(ws, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    r = subprocess.run([sys.executable, "-m", "saelora", "export", "--merge", ws["a1"], str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not (out / "adapter_config.json").exists() and (out / "config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ws["model"], dtype=torch.float32),
                                     ws["a1"]).eval()
    base = AutoModelForCausalLM.from_pretrained(ws["model"], dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(out)("the cat sat on the mat", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got, want, plain = (m(input_ids=ids).logits for m in (merged, peft, base))
    assert torch.allclose(got, want, atol=1e-4) and not torch.allclose(got, plain, atol=1e-3)
    record = json.loads((out / "saelora_export.json").read_text())
    assert record["spliced"] is False and record["bundle"]["base_model"]["fingerprint"]


def test_export_refuses_a_bundle_of_another_model_and_a_folder_with_files(ws, tmp_path):
    from saelora.adapters.bundle import BundleError
    from saelora.adapters.errors import ConfigError
    from saelora.trainer.export import ExportConfig, export_merged

    other = tiny_workspace(tmp_path / "other", d_model=64, n_heads=4)  # another model: its fingerprint differs
    with pytest.raises(BundleError):
        export_merged(ExportConfig(merge=ws["a1"], out=str(tmp_path / "x"), model=other["model"]))
    assert not (tmp_path / "x").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError):
        export_merged(ExportConfig(merge=ws["a1"], out=str(tmp_path / "full")))
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
