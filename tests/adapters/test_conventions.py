"""Real SAE conventions, honoured or refused, on hand-made sae-lens folders; and precision (fast tier)."""

import json
import logging
import math

import pytest
import torch

from saelora.adapters.activations import run_to_hook
from saelora.adapters.hooks import HookError, resolve_hook
from saelora.adapters.saes import SAELoadError, load_sae
from saelora.adapters.splice_hooks import splice
from tiny import make_sae, save_sae, tiny_gpt2, tiny_llama

IDS = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(3))


def _folder(tmp_path, name="sae", **cfg_extra):
    sae = make_sae("topk", **cfg_extra)
    return sae, save_sae(sae, tmp_path / name)


def _edit_cfg(folder, **changes):
    cfg = json.loads((folder / "cfg.json").read_text())
    meta = changes.pop("metadata", {})
    cfg.update(changes)
    cfg.setdefault("metadata", {}).update(meta)
    (folder / "cfg.json").write_text(json.dumps(cfg))


def test_norm_scaling_factor_from_a_sae_lens_checkpoint_is_folded(tmp_path, llama):
    original, folder = _folder(tmp_path, normalize_activations="expected_average_only_in")
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 0.25}))
    s = load_sae(llama, str(folder))
    x = torch.randn(5, 32) * 8
    # the SAE was trained on 0.25 * x and reconstructs in that space: latents of 0.25 x, output / 0.25
    torch.testing.assert_close(s.encode(x), original.encode(0.25 * x))
    torch.testing.assert_close(s.decode(s.encode(x), x), original.decode(original.encode(0.25 * x)) / 0.25)
    assert s.sae.cfg.normalize_activations == "none"


def test_missing_norm_scaling_factor_is_estimated_as_sae_lens_does(tmp_path, llama):
    _, folder = _folder(tmp_path, normalize_activations="expected_average_only_in")
    s = load_sae(llama, str(folder), calibration=IDS)
    with torch.no_grad():
        x = run_to_hook(llama, s.hook, IDS)
    assert s.folded_scale == pytest.approx(math.sqrt(32) / float(x.norm(dim=-1).mean()), rel=1e-5)
    with pytest.raises(SAELoadError, match="scaling factor"):
        load_sae(llama, str(folder))  # no factor, no tokenizer, no calibration rows


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_centred_sae_reads_centred_activations_and_keeps_the_mean(tmp_path, make):
    model = make()
    original, folder = _folder(tmp_path)
    _edit_cfg(folder, metadata={"model_from_pretrained_kwargs": {"center_writing_weights": True, "fold_ln": True}})
    s = load_sae(model, str(folder))
    assert s.center
    with torch.no_grad():
        x = run_to_hook(model, s.hook, IDS)
        mean = x.mean(-1, keepdim=True)
        want = original.decode(original.encode(x - mean)) + mean
        with splice(model, [s], mode="replace", stats=True):
            got = {}
            h = model.get_submodule("model.layers.1" if hasattr(model, "model") else "transformer.h.1")
            handle = h.register_forward_hook(lambda m, a, o: got.setdefault("x", o[0] if isinstance(o, tuple) else o))
            model(IDS)
            handle.remove()
    torch.testing.assert_close(got["x"], want)


def test_tl_kwargs_that_change_the_stream_are_refused(tmp_path, llama):
    _, folder = _folder(tmp_path)
    _edit_cfg(folder, metadata={"model_from_pretrained_kwargs": {"center_writing_weights": True,
                                                                 "first_n_layers": 4}})
    with pytest.raises(SAELoadError, match="first_n_layers"):
        load_sae(llama, str(folder))


def test_unsupported_normalisation_is_refused(tmp_path, llama):
    _, folder = _folder(tmp_path)
    _edit_cfg(folder, normalize_activations="covariance_whitening")
    with pytest.raises((SAELoadError, ValueError)):
        load_sae(llama, str(folder))


def test_model_name_mismatch_warns_naming_both(tmp_path, llama, caplog):
    _, folder = _folder(tmp_path)
    _edit_cfg(folder, metadata={"model_name": "gemma-2-2b"})
    llama.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    with caplog.at_level(logging.WARNING, logger="saelora.adapters.saes"):
        load_sae(llama, str(folder))
    assert "gemma-2-2b" in caplog.text and "SmolLM2-135M-Instruct" in caplog.text
    caplog.clear()
    _edit_cfg(folder, metadata={"model_name": "smollm2-135m-instruct"})
    with caplog.at_level(logging.WARNING, logger="saelora.adapters.saes"):
        load_sae(llama, str(folder))
    assert "trained on model" not in caplog.text


@pytest.mark.parametrize("hook", ["blocks.1.hook_mlp_out", "blocks.1.attn.hook_z", "blocks.1.hook_resid_mid"])
def test_hooks_other_than_the_residual_stream_are_refused(llama, hook):
    with pytest.raises(HookError, match="not supported"):
        resolve_hook(llama, hook)


def test_prepend_bos_sae_gets_bos_rows_and_keeps_bos(tmp_path, llama):
    class Tok:
        bos_token_id, eos_token_id = 1, 2

        def __call__(self, text):
            return {"input_ids": [7]}  # adds no BOS by itself

    _, folder = _folder(tmp_path)
    _edit_cfg(folder, metadata={"prepend_bos": True})
    s = load_sae(llama, str(folder), tokenizer=Tok())
    assert s.policy.prepend_bos and not s.policy.keep_first and s.policy.keep_token_ids == (1, 2)
    _edit_cfg(folder, metadata={"prepend_bos": False})
    s = load_sae(llama, str(folder), tokenizer=Tok())
    assert not s.policy.prepend_bos and s.policy.keep_first


def test_sae_computes_in_fp32_on_a_bf16_model_and_e2e_updates_survive(tmp_path):
    """bf16 model, fp32 SAE: tiny learning-rate updates that bf16 weights would round away still land."""
    from saelora.trainer.objective import ObjectiveWeights, objective

    model = tiny_llama().to(torch.bfloat16).requires_grad_(False)
    _, folder = _folder(tmp_path)
    s = load_sae(model, str(folder))
    assert all(p.dtype == torch.float32 for p in s.sae.parameters())
    params = [p.requires_grad_(True) for p in s.sae.parameters()]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    for _ in range(2):
        opt.zero_grad()
        loss, _ = objective(model, [s], IDS, ObjectiveWeights(), None)
        loss.backward()
        opt.step()
    names = [n for n, _ in s.sae.named_parameters()]
    b_dec = dict(s.sae.named_parameters())["b_dec"]
    assert b_dec.dtype == torch.float32
    # every element of b_dec (~0.1) moved by ~2e-5: far below bf16's resolution there (~5e-4)
    assert (b_dec.detach() != before[names.index("b_dec")]).all()


def test_teacher_is_deterministic_while_lora_dropout_trains(tmp_path):
    """GPT-2 with dropout: the frozen model runs in eval mode in training, only LoRA dropout is active."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from saelora.trainer.lora import LoraSettings, add_lora
    from saelora.trainer.loop import Trainee, training_mode
    from saelora.trainer.objective import teacher_logits

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                      resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)).requires_grad_(False)
    s = load_sae(base, str(save_sae(make_sae("topk"), tmp_path / "s")))
    model = add_lora(base, LoraSettings(rank=4, dropout=0.3), [s.hook])
    training_mode(Trainee(model, [s], [], None, True))
    assert torch.equal(teacher_logits(model, IDS), teacher_logits(model, IDS))
    modes = {n: m.training for n, m in model.named_modules()}
    assert any(v for n, v in modes.items() if "lora_dropout" in n)
    assert not any(v for n, v in modes.items() if n.endswith(("attn_dropout", "resid_dropout", "drop")))
