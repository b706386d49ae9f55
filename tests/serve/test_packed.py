"""The torch engine's prepacked oneDNN linear layers (serve/torch_engine/packed.py)."""

import pytest
import torch
import torch.nn.functional as F

from saelora.serve.core.packed import pack_linears, packing_available

pytestmark = pytest.mark.skipif(not packing_available(torch.nn.Linear(2, 2)), reason="no oneDNN on this torch")


def test_packed_linear_equals_f_linear_and_is_row_independent():
    """Invariants: the packed layer computes x W^T + b (to fp32 kernel rounding), and a row's output does not
    depend on the rows batched with it: a batch of 8 equals its 8 rows run alone, bit for bit."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 160)
    ref = torch.nn.Linear(96, 160)
    ref.load_state_dict(lin.state_dict())
    assert pack_linears(torch.nn.Sequential(lin)) == 1
    x = torch.randn(8, 96)
    with torch.no_grad():
        full = lin(x)
        torch.testing.assert_close(full, F.linear(x, ref.weight, ref.bias), atol=1e-5, rtol=1e-5)
        assert torch.equal(full, torch.cat([lin(x[i:i + 1]) for i in range(8)]))
        assert lin(x[None]).shape == (1, 8, 160)  # (B, T, d) inputs keep their shape


def test_gradients_fall_back_and_packing_is_idempotent():
    """With gradients wanted the layer is plain F.linear (the packed op has no backward); packing twice packs
    nothing more; fp64 and LoRA's own A/B layers are left alone."""
    seq = torch.nn.Sequential(torch.nn.Linear(8, 8))
    assert pack_linears(seq) == 1 and pack_linears(seq) == 0
    y = seq(torch.randn(2, 8))
    assert y.grad_fn is not None
    y.sum().backward()
    assert seq[0].weight.grad is not None
    assert pack_linears(torch.nn.Sequential(torch.nn.Linear(8, 8)).double()) == 0


def test_packed_model_matches_and_peft_still_wraps_it(llama):
    """On a model: the same logits as before packing (kernel rounding), and PEFT still finds every packed
    layer to wrap (they stay nn.Linear), its LoRA running on top of the packed base."""
    from peft import LoraConfig, get_peft_model

    model = llama.eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 7))
    with torch.no_grad():
        before = model(ids).logits
        n = pack_linears(model)
        after = model(ids).logits
    assert n == sum(type(m) is torch.nn.Linear for m in model.modules())
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    with torch.no_grad():
        lora_out = peft(ids).logits
        with peft.disable_adapter():
            base_out = peft(ids).logits
    assert not torch.allclose(lora_out, base_out)
    torch.testing.assert_close(base_out, after, atol=0, rtol=0)


@pytest.mark.parametrize("rescale", [True, False])
def test_packed_topk_encoder_equals_sae_lens(rescale):
    """Invariants: a packed TopK encoder gives sae-lens's latents (fp32 kernel rounding; the same active latents),
    a row's latents do not depend on the rows beside it (bit for bit), sae-lens's hook points still fire, and
    with gradients wanted it is sae-lens's own encode exactly."""
    from tiny import make_sae

    from saelora.serve.core.packed import pack_sae_encoder

    sae = make_sae("topk", d_in=48, d_sae=96, rescale_acts_by_decoder_norm=rescale)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(96, 1) + 0.5)  # decoder rows of different norms: the rescale matters
    x = torch.randn(3, 5, 48) * 4
    with torch.no_grad():
        want = sae.encode(x)
    assert pack_sae_encoder(sae) and not pack_sae_encoder(sae)  # packed once
    seen = []
    sae.hook_sae_acts_post.add_hook(lambda acts, hook: seen.append(acts.shape))
    with torch.no_grad():
        got = sae.encode(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert torch.equal(got > 0, want > 0)
        assert torch.equal(got, torch.cat([sae.encode(x[i:i + 1]) for i in range(3)]))
    assert seen and seen[0] == (3, 5, 96)
    sae.requires_grad_(True)
    assert torch.equal(sae.encode(x), type(sae).encode(sae, x))


def test_only_topk_encoders_are_packed():
    """Other architectures keep sae-lens's own encode (saelora does not rewrite every architecture)."""
    from tiny import make_sae

    from saelora.serve.core.packed import pack_sae_encoder

    for arch in ("standard", "jumprelu", "gated"):
        sae = make_sae(arch, d_in=48, d_sae=96)
        assert not pack_sae_encoder(sae) and "encode" not in vars(sae)
