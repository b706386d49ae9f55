"""SAE loading through sae-lens folders and hook resolution onto llama- and gpt2-style models."""

import json

import pytest
import torch

from saelora.adapters.hooks import HookError, HookPoint, resolve_hook
from saelora.adapters.saes import SAELoadError, load_sae
from saelora.adapters.splice_hooks import splice
from tiny import make_sae, save_sae, tiny_gpt2, tiny_llama

IDS = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_architecture_round_trips_and_splices(tmp_path, arch, make):
    model = make()
    original = make_sae(arch)
    folder = save_sae(original, tmp_path / arch)
    s = load_sae(model, str(folder))
    assert s.architecture == arch and s.hook == HookPoint(1, "post") and s.d_sae == 64
    x = torch.randn(3, 32)
    torch.testing.assert_close(s.sae.encode(x), original.encode(x))
    assert (s.sae.encode(x) > 0).any(), "the test SAE must have active latents"
    with torch.no_grad():
        base = model(IDS).logits
        with splice(model, [s], mode="error_term", top_k=4) as sp:
            assert torch.equal(model(IDS).logits, base)
        with splice(model, [s], mode="replace"):
            assert not torch.allclose(model(IDS).logits, base, atol=1e-4)
    assert sp.pop_captures()[s.name][0].indices.shape == (2, 9, 4)
    assert not any(p.requires_grad for p in s.sae.parameters())


def test_fingerprint_tracks_weights(tmp_path, llama):
    a = load_sae(llama, str(save_sae(make_sae("standard", seed=0), tmp_path / "a")))
    a2 = load_sae(llama, str(tmp_path / "a"))
    b = load_sae(llama, str(save_sae(make_sae("standard", seed=1), tmp_path / "b")))
    assert a.fingerprint["id"] == a2.fingerprint["id"] != b.fingerprint["id"]


@pytest.mark.parametrize("name,expected", [
    ("blocks.0.hook_resid_post", HookPoint(0, "post")),
    ("blocks.2.hook_resid_pre", HookPoint(2, "pre")),
    ("model.layers.1", HookPoint(1, "post")),
    ("base_model.model.model.layers.2", HookPoint(2, "post")),
])
def test_hook_names_llama(llama, name, expected):
    assert resolve_hook(llama, name) == expected


def test_hook_names_gpt2(gpt2):
    assert resolve_hook(gpt2, "transformer.h.2") == HookPoint(2, "post")
    assert resolve_hook(gpt2, "blocks.1.hook_resid_pre") == HookPoint(1, "pre")


@pytest.mark.parametrize("name,msg", [
    ("blocks.3.hook_resid_post", "has 3 layers"),
    ("blocks.1.hook_attn_out", "not supported: saelora splices SAEs of the residual stream only"),
    ("model.layers.1.mlp", "Unknown hook"),
    ("model.layers.9", "Unknown hook"),
    ("transformer.h.1", "Unknown hook"),
])
def test_unknown_hooks_are_errors(llama, name, msg):
    with pytest.raises(HookError, match=msg):
        resolve_hook(llama, name)


def test_d_in_mismatch_is_error(tmp_path, llama):
    folder = save_sae(make_sae("standard", d_in=48), tmp_path / "wide")
    with pytest.raises(HookError, match="d_in=48 does not match the model's hidden size 32"):
        load_sae(llama, str(folder))


def test_hook_from_metadata_and_override(tmp_path, llama):
    folder = save_sae(make_sae("topk", hook="blocks.2.hook_resid_pre"), tmp_path / "s")
    assert load_sae(llama, str(folder)).hook == HookPoint(2, "pre")
    assert load_sae(llama, str(folder), hook="model.layers.0", name="mine").name == "mine"
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"].pop("hook_name")
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(HookError, match="names no hook"):
        load_sae(llama, str(folder))


def test_bad_sae_specs(tmp_path, llama):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SAELoadError, match="missing cfg.json, sae_weights.safetensors"):
        load_sae(llama, str(tmp_path / "empty"))
    with pytest.raises(SAELoadError, match="not a sae-lens folder"):
        load_sae(llama, str(tmp_path / "nowhere"))
    with pytest.raises(SAELoadError, match="offline"):
        load_sae(llama, "gpt2-small-res-jb:blocks.8.hook_resid_pre")
