"""Invariants of the splice on tiny random models (fast tier)."""

import pytest
import torch

from saelora.adapters.hooks import decoder_layers
from saelora.adapters.saes import place_sae
from saelora.adapters.splice import LatentEdit, RowSpec, SpliceError
from saelora.adapters.splice_hooks import splice
from tiny import make_sae, tiny_gpt2, tiny_llama

IDS = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))


def _placed(model, arch="standard", hook="blocks.1.hook_resid_post", name=None, seed=0):
    return place_sae(model, make_sae(arch, hook=hook, seed=seed), source=f"tiny-{arch}", name=name)


def _resid(model, layer, ids=IDS):
    """Residual stream after decoder layer `layer`, computed with a plain hook."""
    store = {}
    h = decoder_layers(model)[layer].register_forward_hook(lambda m, a, o: store.setdefault("x", o))
    with torch.no_grad():
        model(ids)
    h.remove()
    return store["x"]


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_error_term_without_edits_reproduces_base_logits(make):
    model = make()
    s = _placed(model)
    with torch.no_grad():
        base = model(IDS).logits
        with splice(model, [s], mode="error_term", top_k=4):
            spliced = model(IDS).logits
    torch.testing.assert_close(spliced, base, atol=1e-5, rtol=0)
    assert torch.equal(spliced, base)  # not just close: the stream is left untouched bit for bit


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_replace_equals_decode_encode_by_hand(make):
    model = make()
    s = _placed(model)
    x = _resid(model, 1)
    expected_recon = s.sae.decode(s.sae.encode(x))
    seen = {}
    h = decoder_layers(model)[2].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad(), splice(model, [s], mode="replace"):
        model(IDS)
    h.remove()
    torch.testing.assert_close(seen["x"], expected_recon, atol=1e-6, rtol=0)
    assert not torch.allclose(expected_recon, x, atol=1e-3)  # the SAE really is lossy here


def test_off_equals_base(llama):
    s = _placed(llama)
    with torch.no_grad():
        base = llama(IDS).logits
        with splice(llama, [s], mode="off"):
            assert torch.equal(llama(IDS).logits, base)


def test_replace_changes_logits(llama):
    s = _placed(llama)
    with torch.no_grad():
        base = llama(IDS).logits
        with splice(llama, [s], mode="replace"):
            assert not torch.allclose(llama(IDS).logits, base, atol=1e-3)


@pytest.mark.parametrize("op,value", [("set", 3.0), ("add", 1.5), ("scale", 2.0), ("clamp_max", 0.01),
                                      ("clamp_min", 2.5), ("ablate", 0.0)])
def test_each_edit_op_changes_exactly_the_named_latent(llama, op, value):
    s = _placed(llama)
    x = _resid(llama, 1)
    z = s.sae.encode(x)  # (B, T, S) clean latents
    # pick a feature active somewhere in row 0 so every op has something to change
    feature = int((z[0] > 0).sum(0).argmax())
    rows = [RowSpec(edits=[LatentEdit(s.name, feature, op, value)]), RowSpec()]
    with torch.no_grad(), splice(llama, [s], mode="error_term", dense=True, rows=rows) as sp:
        llama(IDS)
    z_edit = sp.pop_dense()[s.name][0]
    expected = z.clone()
    col = expected[0, :, feature]
    expected[0, :, feature] = {"set": torch.full_like(col, value), "add": col + value, "scale": col * value,
                               "clamp_max": col.clamp(max=value), "clamp_min": col.clamp(min=value),
                               "ablate": torch.zeros_like(col)}[op]
    torch.testing.assert_close(z_edit, expected, atol=1e-6, rtol=0)
    changed = (z_edit != z).any(dim=1)  # (B, S): which latents changed in each row
    assert changed[0, feature]
    changed[0, feature] = False
    assert not changed.any(), "an edit touched a latent or row it does not name"


def test_zero_edit_changes_nothing(llama):
    s = _placed(llama)
    with torch.no_grad():
        base = llama(IDS).logits
        rows = [RowSpec(edits=[LatentEdit(s.name, 5, "add", 0.0)])] * 2
        with splice(llama, [s], mode="error_term", rows=rows):
            out = llama(IDS).logits
    torch.testing.assert_close(out, base, atol=1e-5, rtol=0)


def test_edit_positions_select_tokens(llama):
    s = _placed(llama)
    rows = [RowSpec(edits=[LatentEdit(s.name, 3, "set", 9.0, positions="generated")], prompt_len=8),
            RowSpec(edits=[LatentEdit(s.name, 3, "set", 9.0, positions=(0, 4))], prompt_len=8)]
    with torch.no_grad(), splice(llama, [s], mode="error_term", dense=True, rows=rows) as sp:
        llama(IDS)
    z = sp.pop_dense()[s.name][0]
    hit = z[:, :, 3] == 9.0
    assert hit[0].tolist() == [False] * 8 + [True] * 4
    assert hit[1].nonzero().flatten().tolist() == [0, 4]


def test_rows_with_different_edits_equal_their_solo_runs(llama):
    s = _placed(llama)
    edits = [[LatentEdit(s.name, 7, "set", 4.0)], []]
    with torch.no_grad():
        with splice(llama, [s], mode="error_term", rows=[RowSpec(edits=e) for e in edits]):
            both = llama(IDS).logits
        for r in range(2):
            with splice(llama, [s], mode="error_term", rows=[RowSpec(edits=edits[r])]):
                solo = llama(IDS[r:r + 1]).logits
            torch.testing.assert_close(both[r:r + 1], solo, atol=1e-5, rtol=1e-5)


def test_per_row_modes(llama):
    s = _placed(llama)
    with torch.no_grad():
        base = llama(IDS).logits
        with splice(llama, [s], mode="replace"):
            replaced = llama(IDS).logits
        rows = [RowSpec(modes={s.name: "off"}), RowSpec()]
        with splice(llama, [s], mode="replace", rows=rows):
            mixed = llama(IDS).logits
    assert torch.equal(mixed[0], base[0])
    torch.testing.assert_close(mixed[1], replaced[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [1, 5])
def test_captured_topk_equals_topk_of_dense(llama, k):
    s = _placed(llama)
    with torch.no_grad(), splice(llama, [s], mode="replace", top_k=k, dense=True) as sp:
        llama(IDS)
    cap = sp.pop_captures()[s.name][0]
    dense = sp.pop_dense()[s.name][0]
    values, indices = dense.topk(k, dim=-1)
    assert cap.indices.shape == (2, 12, k)
    torch.testing.assert_close(cap.values, values)
    torch.testing.assert_close(torch.gather(dense, -1, cap.indices), values)
    assert cap.positions.tolist() == [list(range(12))] * 2


def test_two_saes_at_two_layers(llama):
    s0 = _placed(llama, hook="blocks.0.hook_resid_post", name="l0", seed=1)
    s2 = _placed(llama, arch="topk", hook="blocks.2.hook_resid_pre", name="l2", seed=2)
    with torch.no_grad():
        base = llama(IDS).logits
        with splice(llama, [s0], mode="replace"):
            only0 = llama(IDS).logits
        with splice(llama, [s0, s2], mode="replace", top_k=3) as sp:
            both = llama(IDS).logits
        caps = sp.pop_captures()
    assert set(caps) == {"l0", "l2"} and all(len(v) == 1 for v in caps.values())
    assert not torch.allclose(both, only0, atol=1e-4) and not torch.allclose(only0, base, atol=1e-4)
    # resid_pre of layer 2 is resid_post of layer 1: the second SAE sees the first one's effect
    with torch.no_grad(), splice(llama, [s0], mode="replace"):
        x_pre2 = _resid(llama, 1)
    assert torch.equal(caps["l2"][0].indices, s2.sae.encode(x_pre2).topk(3, dim=-1).indices)


def test_hooks_removed_after_exception(llama):
    s = _placed(llama)
    layers = decoder_layers(llama)
    with pytest.raises(RuntimeError, match="boom"):
        with splice(llama, [s], mode="replace"):
            raise RuntimeError("boom")
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in layers)
    assert not llama.model._forward_pre_hooks


def test_hooks_removed_after_error_inside_forward(llama):
    s = _placed(llama)
    with pytest.raises(SpliceError):
        with splice(llama, [s], rows=[RowSpec()] * 3):  # 3 row specs, batch of 2
            llama(IDS)
    assert not decoder_layers(llama)[1]._forward_hooks


def test_left_padding_positions_from_attention_mask(llama):
    s = _placed(llama)
    ids = IDS[:1, :6]
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    rows = [RowSpec(edits=[LatentEdit(s.name, 2, "set", 5.0, positions=(0,))])]
    with torch.no_grad(), splice(llama, [s], mode="error_term", top_k=2, dense=True, rows=rows) as sp:
        llama(padded, attention_mask=mask)
    cap = sp.pop_captures()[s.name][0]
    assert cap.positions.tolist() == [[-1, -1, -1, 0, 1, 2, 3, 4, 5]]
    z = sp.pop_dense()[s.name][0]
    assert (z[0, :, 2] == 5.0).nonzero().flatten().tolist() == [3]  # position 0 is the 4th column


def test_generate_tracks_generated_positions(llama):
    s = _placed(llama)
    rows = [RowSpec(edits=[LatentEdit(s.name, 1, "set", 7.0, positions="generated")], prompt_len=5)]
    with torch.no_grad(), splice(llama, [s], mode="error_term", top_k=1, rows=rows) as sp:
        llama.generate(IDS[:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
    caps = sp.pop_captures()[s.name]
    positions = torch.cat([c.positions for c in caps], 1).flatten().tolist()
    assert positions == list(range(8))  # prompt 0..4 then 3 cached decode steps 5..7
    vals = torch.cat([c.values for c in caps], 1)[0, :, 0]
    idx = torch.cat([c.indices for c in caps], 1)[0, :, 0]
    assert all(idx[5:] == 1) and all(vals[5:] == 7.0)
    assert not (idx[:5] == 1).all() or not (vals[:5] == 7.0).any()


@pytest.mark.parametrize("edit,msg", [
    (LatentEdit("blocks.1.hook_resid_post", 64, "set", 1.0), "outside"),
    (LatentEdit("blocks.1.hook_resid_post", -1, "set", 1.0), "outside"),
    (LatentEdit("blocks.1.hook_resid_post", 1, "multiply", 1.0), "Unknown edit op"),
    (LatentEdit("blocks.1.hook_resid_post", 1, "set", float("nan")), "finite"),
    (LatentEdit("blocks.1.hook_resid_post", 1, "set", 1.0, positions="future"), "positions"),
    (LatentEdit("blocks.1.hook_resid_post", 1, "set", 1.0, positions=(-2,)), "non-negative"),
    (LatentEdit("nope", 1, "set", 1.0), "Unknown SAE"),
])
def test_bad_edits_are_errors(llama, edit, msg):
    s = _placed(llama)
    with pytest.raises(SpliceError, match=msg):
        with splice(llama, [s], rows=[RowSpec(edits=[edit])]):
            pass


def test_bad_mode_is_error(llama):
    with pytest.raises(SpliceError, match="mode"):
        splice(llama, [_placed(llama)], mode="swap").__enter__()


def test_stats_match_hand_computation(llama):
    s = _placed(llama)
    x = _resid(llama, 1)
    z = s.sae.encode(x)
    recon = s.sae.decode(z)
    with torch.no_grad(), splice(llama, [s], mode="replace", stats=True) as sp:
        llama(IDS)
    st = sp.pop_stats()[s.name][0]
    flat = x.reshape(-1, x.shape[-1])
    torch.testing.assert_close(st.sse, (x - recon).pow(2).sum())
    torch.testing.assert_close(st.sst, (flat - flat.mean(0)).pow(2).sum())
    assert st.l0.item() == (z > 0).sum().item() and st.n.item() == 24
