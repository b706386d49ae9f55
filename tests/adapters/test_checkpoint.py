"""The model fingerprint read from checkpoint files, and the weightless skeleton the vLLM engine keeps
(issue: no second model copy on the GPU)."""

import pytest
import torch

from saelora.adapters.checkpoint import fingerprint_checkpoint
from saelora.adapters.fingerprint import fingerprint_module
from saelora.adapters.logit_lens import top_logits
from saelora.adapters.models import load_model
from saelora.adapters.saes import load_sae
from tiny import tiny_workspace


@pytest.fixture(params=["llama", "gemma3"])  # untied and tied embeddings
def ws(request, tmp_path, monkeypatch):
    monkeypatch.setenv("SAELORA_CACHE", str(tmp_path / "cache"))
    return tiny_workspace(tmp_path, family=request.param, d_model=128)


def test_file_fingerprint_equals_the_fp32_module_fingerprint(ws):
    """Invariant: the definition bundles were validated against (the fp32 module) is kept, tied weights included."""
    lm = load_model(ws["model"], device="cpu", dtype="float32")
    module = fingerprint_module(lm.model, lm.model.config.to_dict())
    assert fingerprint_checkpoint(lm.path, lm.model, lm.model.config.to_dict()) == module
    assert lm.fingerprint == module


def test_fingerprint_does_not_depend_on_the_load_dtype(ws, tmp_path):
    """A bf16 checkpoint: fp32 and bf16 loads (CPU vs GPU runs) fingerprint alike, so bundles move between them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = AutoModelForCausalLM.from_pretrained(ws["model"], dtype=torch.bfloat16)
    src.save_pretrained(tmp_path / "bf16")
    AutoTokenizer.from_pretrained(ws["model"]).save_pretrained(tmp_path / "bf16")
    fp32 = load_model(str(tmp_path / "bf16"), device="cpu", dtype="float32")
    (tmp_path / "bf16" / "saelora_fingerprint.json").unlink()  # no cached answer: recompute for the bf16 load
    bf16 = load_model(str(tmp_path / "bf16"), device="cpu", dtype="bfloat16")
    assert bf16.fingerprint == fp32.fingerprint
    assert fp32.fingerprint == fingerprint_module(fp32.model, fp32.model.config.to_dict())
    assert fp32.fingerprint != load_model(ws["model"], device="cpu").fingerprint  # bf16 rounding is a change


def test_skeleton_holds_no_weights_but_the_logit_lens(ws):
    """weights=False: every parameter on the meta device except the final norm and the unembedding; the same
    fingerprint, SAE placement and logit-lens answers as the full load."""
    full = load_model(ws["model"], device="cpu")
    skel = load_model(ws["model"], device="cpu", weights=False)
    real = {n for n, p in skel.model.named_parameters() if not p.is_meta}
    assert real and all(n.startswith(("lm_head", "model.norm", "model.embed_tokens")) for n in real), real
    assert sum(p.numel() for p in skel.model.parameters() if not p.is_meta) < \
        0.5 * sum(p.numel() for p in full.model.parameters())
    assert skel.fingerprint == full.fingerprint
    sae_full = load_sae(full.model, ws["saes"][0], tokenizer=full.tokenizer)
    sae_skel = load_sae(skel.model, ws["saes"][0], tokenizer=skel.tokenizer)
    assert sae_skel.hook == sae_full.hook and next(sae_skel.sae.parameters()).device.type == "cpu"
    assert top_logits(skel.model, sae_skel, k=5, indices=[0, 7]) == top_logits(full.model, sae_full, k=5,
                                                                               indices=[0, 7])
