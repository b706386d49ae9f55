"""Adapter bundle: round trip, PEFT compatibility, and one clear message per kind of breakage."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from saelora.adapters.bundle import (BundleError, BundleManifest, attach_bundle, detach_adapter, load_bundle,
                                     save_bundle, validate_bundle)
from saelora.adapters.fingerprint import fingerprint_module
from saelora.adapters.saes import place_sae
from tiny import make_sae, tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def trained(tmp_path):
    """A tiny base model, an SAE placed on it, and a saved bundle with non-trivial LoRA weights."""
    base = tiny_llama()
    fp = fingerprint_module(base, base.config.to_dict())
    sae = place_sae(base, make_sae("topk"), source="tiny-topk")
    peft = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    manifest = BundleManifest(base_model={"spec": "tiny", "fingerprint": fp}, saes=[sae.describe()],
                              training={"steps": 3}, metrics={"kl": 0.5})
    path = save_bundle(tmp_path / "bundle", peft, manifest)
    return base, fp, sae, peft, path


def test_round_trip(trained):
    base, fp, sae, peft, path = trained
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "saelora.json"]
    b = load_bundle(path, model_fingerprint=fp, saes=[sae], model=base)
    assert b.manifest.base_model["fingerprint"]["id"] == fp["id"]
    assert b.manifest.saes[0]["hook"] == "blocks.1.hook_resid_post"
    assert b.manifest.lora["r"] == 4 and b.manifest.lora["target_modules"] == sorted(TARGETS)
    assert b.manifest.training == {"steps": 3} and b.manifest.metrics == {"kl": 0.5}
    assert b.lora_config["peft_type"] == "LORA"


def test_peft_loads_bundle_unmodified(trained):
    base, fp, sae, peft, path = trained
    loaded = PeftModel.from_pretrained(base, str(path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, peft(IDS).logits, atol=1e-6, rtol=0)


def test_attach_then_detach_restores_outputs_exactly(trained):
    base, fp, sae, peft, path = trained
    with torch.no_grad():
        before = base(IDS).logits
        model = attach_bundle(base, load_bundle(path), "a1")
        adapted = model(IDS).logits
        model = detach_adapter(model, "a1")
        after = model(IDS).logits
    assert not torch.allclose(adapted, before, atol=1e-4)
    assert torch.equal(after, before)
    assert model is base and not any("lora" in n for n, _ in base.named_modules())


def test_detach_one_of_two_adapters(trained):
    base, fp, sae, peft, path = trained
    b = load_bundle(path)
    with torch.no_grad():
        model = attach_bundle(base, b, "a1")
        only_a1 = model(IDS).logits
        model = attach_bundle(model, b, "a2")
        model.set_adapter("a1")
        model = detach_adapter(model, "a2")
        assert list(model.peft_config) == ["a1"]
        assert torch.equal(model(IDS).logits, only_a1)


def _break(path, how):
    if how == "missing_config":
        (path / "adapter_config.json").unlink()
    elif how == "missing_weights":
        (path / "adapter_model.safetensors").unlink()
    elif how == "missing_manifest":
        (path / "saelora.json").unlink()
    elif how == "not_safetensors":
        (path / "adapter_model.safetensors").write_bytes(b"\x80\x04this is a pickle, not safetensors")
    elif how == "pickle_present":
        (path / "adapter_model.bin").write_bytes(b"\x80\x04")
    elif how in ("rank", "targets"):
        m = json.loads((path / "saelora.json").read_text())
        if how == "rank":
            m["lora"]["r"] = 8
        else:
            m["lora"]["target_modules"] = ["q_proj"]
        (path / "saelora.json").write_text(json.dumps(m))
    elif how == "config_rank":
        c = json.loads((path / "adapter_config.json").read_text())
        c["r"] = 2
        (path / "adapter_config.json").write_text(json.dumps(c))
    elif how in ("lone_a", "pair_ranks"):  # one module's lora_B dropped, or cut to a rank its lora_A lacks
        from safetensors.torch import load_file, save_file

        state = load_file(str(path / "adapter_model.safetensors"))
        key = sorted(k for k in state if ".lora_B." in k)[0]
        if how == "lone_a":
            del state[key]
        else:
            state[key] = state[key][:, :2].contiguous()
        save_file(state, str(path / "adapter_model.safetensors"))
    elif how in FEATURES:
        c = json.loads((path / "adapter_config.json").read_text())
        c.update(FEATURES[how])
        (path / "adapter_config.json").write_text(json.dumps(c))


# PEFT features beyond a plain LoRA delta: refused by the allow-list (they would alter the shared model)
FEATURES = {"dora": {"use_dora": True}, "replication": {"layer_replication": [[0, 2]]},
            "modules_to_save": {"modules_to_save": ["lm_head"]}, "lora_bias": {"lora_bias": True},
            "bias": {"bias": "all"}, "unknown": {"some_future_feature": {"on": 1}}}


@pytest.mark.parametrize("how,message", [
    ("missing_config", "missing adapter_config.json"),
    ("missing_weights", "missing adapter_model.safetensors"),
    ("missing_manifest", "missing saelora.json"),
    ("not_safetensors", "is not a safetensors file"),
    ("pickle_present", "pickle weights are never loaded"),
    ("rank", "rank mismatch: manifest says r=8"),
    ("targets", "target mismatch"),
    ("config_rank", "has rank 4, adapter_config.json says r=2"),
    ("lone_a", "has no lora_B beside it"),
    ("pair_ranks", ".lora_B.weight has 2"),
    ("dora", "'use_dora' is set, which is not supported"),
    ("replication", "'layer_replication' is set"),
    ("modules_to_save", "'modules_to_save' is set"),
    ("lora_bias", "'lora_bias' is set"),
    ("bias", "bias is not 'none'"),
    ("unknown", "'some_future_feature' is set"),
])
def test_each_broken_bundle_has_its_own_message(trained, how, message):
    base, fp, sae, peft, path = trained
    _break(path, how)
    problems = validate_bundle(path, model_fingerprint=fp, saes=[sae])
    assert any(message in p for p in problems), problems
    with pytest.raises(BundleError, match="invalid adapter bundle"):
        load_bundle(path)


def test_wrong_base_model(trained):
    base, fp, sae, peft, path = trained
    other = tiny_llama(seed=7)
    problems = validate_bundle(path, model_fingerprint=fingerprint_module(other, other.config.to_dict()))
    assert problems == [f"wrong base model: bundle was trained on 'tiny' (fingerprint {fp['id']}), this model is "
                        f"{fingerprint_module(other, other.config.to_dict())['id']}; differs in weights"]


def test_sae_mismatch(trained):
    base, fp, sae, peft, path = trained
    other = place_sae(base, make_sae("topk", seed=3), source="other")
    elsewhere = place_sae(base, make_sae("topk", hook="blocks.2.hook_resid_post"), source="elsewhere")
    assert "differs from the bundle's tiny-topk in weights" in validate_bundle(path, saes=[other])[0]
    assert "none is loaded there" in validate_bundle(path, saes=[elsewhere])[0]


def test_wrong_model_shapes(trained, tmp_path):
    base, fp, sae, peft, path = trained
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2))
    problems = validate_bundle(path, model=wide)
    assert any("in_features 32 != model's 48" in p for p in problems)


def test_all_problems_reported_at_once(trained):
    base, fp, sae, peft, path = trained
    for how in ("pickle_present", "rank", "not_safetensors"):
        _break(path, how)
    other = tiny_llama(seed=7)
    problems = validate_bundle(path, model_fingerprint=fingerprint_module(other, other.config.to_dict()))
    assert len(problems) >= 4
    with pytest.raises(BundleError) as err:
        load_bundle(path, model_fingerprint=fingerprint_module(other, other.config.to_dict()))
    assert len(err.value.problems) == len(problems)


def test_not_a_directory(tmp_path):
    assert validate_bundle(tmp_path / "nope") == [f"{tmp_path / 'nope'} is not a directory"]


def test_save_overwrites_atomically(trained):
    base, fp, sae, peft, path = trained
    m = load_bundle(path).manifest
    m.metrics = {"kl": 0.1}
    save_bundle(path, peft, m)
    assert load_bundle(path).manifest.metrics == {"kl": 0.1}
    assert [p.name for p in path.parent.iterdir() if ".tmp" in p.name] == []


def test_messages_name_config_keys_never_their_values(trained):
    """Invariant: a bundle's error never reads back a value from its files (an adapter path is the client's
    choice, and its JSON could be any file the server can read)."""
    base, fp, sae, peft, path = trained
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(secret_setting="s3cr3t-value", peft_type="s3cr3t-type", bias="s3cr3t-bias")
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    manifest = json.loads((path / "saelora.json").read_text())
    manifest["format"] = "s3cr3t-format"
    (path / "saelora.json").write_text(json.dumps(manifest))
    problems = validate_bundle(path)
    assert len(problems) >= 4 and not any("s3cr3t" in p for p in problems), problems


def test_a_symlinked_file_in_a_bundle_is_refused_unread(trained, tmp_path):
    base, fp, sae, peft, path = trained
    outside = tmp_path / "elsewhere.json"
    outside.write_text(json.dumps({"peft_type": "s3cr3t"}))
    (path / "adapter_config.json").unlink()
    (path / "adapter_config.json").symlink_to(outside)
    problems = validate_bundle(path)
    assert problems == ["adapter_config.json is a symbolic link; a bundle's files must be regular files inside it"]


def test_an_oversized_bundle_file_is_refused_unread(trained, monkeypatch):
    from saelora.adapters import bundle

    base, fp, sae, peft, path = trained
    monkeypatch.setitem(bundle.MAX_BYTES, "saelora.json", 64)
    assert validate_bundle(path) == ["saelora.json is over 64 bytes"]
