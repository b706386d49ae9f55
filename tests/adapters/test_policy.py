"""The position policy: one rule for which positions an SAE is spliced at, honoured in every mode (fast tier)."""

import pytest
import torch

from saelora.adapters.hooks import decoder_layers
from saelora.adapters.policy import (PolicyError, PositionPolicy, apply_override, corpus_bos, default_policy,
                                     policy_from_metadata)
from saelora.adapters.saes import place_sae
from saelora.adapters.splice import LatentEdit, RowSpec
from saelora.adapters.splice_hooks import splice
from tiny import make_sae, tiny_gpt2, tiny_llama

BOS, EOS = 1, 2
IDS = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
IDS[0, 5] = EOS  # a document boundary inside a packed row
IDS[1, 8] = BOS
POLICY = PositionPolicy(keep_first=True, keep_token_ids=(BOS, EOS))
KEPT = torch.zeros_like(IDS, dtype=torch.bool)
KEPT[:, 0] = True
KEPT[0, 5] = KEPT[1, 8] = True


class Tok:
    """The two tokenizer facts the policy reads."""

    def __init__(self, bos, eos, adds_bos):
        self.bos_token_id, self.eos_token_id, self._adds = bos, eos, adds_bos

    def __call__(self, text):
        return {"input_ids": ([self.bos_token_id] if self._adds else []) + [7]}


def _hidden_after(model, layer, ids=IDS):
    store = {}
    h = decoder_layers(model)[layer].register_forward_hook(lambda m, a, o: store.setdefault("x", o[0] if
                                                                                        isinstance(o, tuple) else o))
    with torch.no_grad():
        logits = model(ids).logits
    h.remove()
    return store["x"], logits


def test_keep_mask_marks_padding_first_position_and_special_ids():
    pos = torch.arange(12)[None].expand(2, 12).clone()
    pos[1, :2] = -1  # left padding
    keep = POLICY.keep_mask(pos, IDS)
    expected = KEPT.clone()
    expected[1, :2] = True
    expected[1, 0] = True
    assert torch.equal(keep, expected)
    assert not PositionPolicy(keep_first=False).keep_mask(torch.arange(4)[None], None).any()


MODES = [("replace", []), ("error_term", [LatentEdit("s", 3, "set", 9.0)]), ("error_term", []), ("off", []),
         ("replace", [LatentEdit("s", 5, "scale", 3.0)])]


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("mode,edits", MODES)
def test_invariant_positions_outside_the_policy_are_bit_identical_to_base(make, mode, edits):
    """In every mode, with or without edits, the stream at a kept position is the base model's, bit for bit;
    position 0 only sees itself, so its logits are the base model's too."""
    model = make()
    s = place_sae(model, make_sae("topk", hook="blocks.1.hook_resid_post"), source="t", name="s", policy=POLICY)
    base_h, base_logits = _hidden_after(model, 1)
    with splice(model, [s], mode=mode, rows=[RowSpec(edits=list(edits))] * 2):
        h, logits = _hidden_after(model, 1)
    assert torch.equal(h[KEPT], base_h[KEPT])
    assert torch.equal(logits[:, 0], base_logits[:, 0])
    if mode == "replace" or edits:
        assert not torch.allclose(h[~KEPT], base_h[~KEPT], atol=1e-4)  # the other positions are spliced


def test_stats_count_only_spliced_positions(llama):
    s = place_sae(llama, make_sae("topk"), source="t", policy=POLICY)
    with splice(llama, [s], mode="replace", stats=True) as sp:
        with torch.no_grad():
            llama(IDS)
    st = sp.pop_stats()[s.name][0]
    assert int(st.n) == int((~KEPT).sum())


def test_policy_is_derived_from_metadata_and_tokenizer():
    smol = Tok(bos=1, eos=2, adds_bos=False)  # SmolLM2: a BOS token that is never added
    gemma = Tok(bos=2, eos=1, adds_bos=True)
    assert default_policy(smol) == PositionPolicy(keep_first=True, keep_token_ids=(1, 2), prepend_bos=False)
    assert default_policy(gemma) == PositionPolicy(keep_first=False, keep_token_ids=(1, 2), prepend_bos=True)
    # sae-lens SAEs trained by TransformerLens with prepend_bos: rows start with BOS when the model has one
    assert policy_from_metadata({"prepend_bos": True}, smol).prepend_bos
    assert not policy_from_metadata({"prepend_bos": False}, gemma).prepend_bos
    recorded = {"saelora_policy": {"keep_first": False, "keep_token_ids": [9], "prepend_bos": False}}
    assert policy_from_metadata(recorded, gemma) == PositionPolicy(False, (9,), False)


def test_override_replaces_only_the_fields_given():
    p = apply_override(POLICY, "keep_first=0")
    assert p == PositionPolicy(keep_first=False, keep_token_ids=(BOS, EOS))
    assert apply_override(POLICY, "keep_ids=,prepend_bos=1") == PositionPolicy(True, (), True)
    assert apply_override(POLICY, None) is POLICY
    for bad in ("keep_first=maybe", "keep_ids=a", "bogus=1", "keep_first"):
        with pytest.raises(PolicyError, match="position policy"):
            apply_override(POLICY, bad)


def test_saes_spliced_together_must_agree_on_bos():
    assert corpus_bos([POLICY, POLICY]) is False
    with pytest.raises(PolicyError, match="prepend_bos"):
        corpus_bos([POLICY, PositionPolicy(prepend_bos=True)])


def test_edits_never_reach_kept_positions(llama):
    s = place_sae(llama, make_sae("topk"), source="t", name="s", policy=POLICY)
    edit = LatentEdit("s", 3, "set", 50.0, positions=(0, 1, 5))
    with splice(llama, [s], mode="error_term", top_k=4, rows=[RowSpec(edits=[edit])] * 2) as sp:
        with torch.no_grad():
            llama(IDS)
    cap = sp.pop_captures()["s"][0]
    set_at = (cap.indices == 3) & (cap.values == 50.0)  # (B, T, k)
    assert set_at.any(-1)[0, 1] and not set_at.any(-1)[0, 0] and not set_at.any(-1)[0, 5]


def test_invariant_massive_activations_stay_original(llama):
    """keep_norm_above: positions whose residual norm at the hook exceeds it are the base model's, bit for bit."""
    base_h, _ = _hidden_after(llama, 1)
    threshold = float(base_h.norm(dim=-1).median())
    policy = PositionPolicy(keep_first=False, keep_norm_above=threshold)
    massive = base_h.norm(dim=-1) > threshold
    s = place_sae(llama, make_sae("topk"), source="t", name="s", policy=policy)
    with splice(llama, [s], mode="replace", stats=True) as sp:
        h, _ = _hidden_after(llama, 1)
    assert 0 < int(massive.sum()) < massive.numel()
    assert torch.equal(h[massive], base_h[massive])
    assert int(sp.pop_stats()["s"][0].n) == int((~massive).sum())
    assert apply_override(policy, "keep_norm_above=") == PositionPolicy(keep_first=False)
    assert PositionPolicy.from_json(policy.to_json()) == policy


def test_bundle_trained_under_another_policy_is_refused(tmp_path):
    """An adapter was trained for the positions its SAE was spliced at; serving it under another policy is an error."""
    from saelora.adapters.bundle import validate_bundle
    from saelora.adapters.models import load_model
    from saelora.adapters.saes import load_sae
    from tiny import make_bundle, tiny_workspace

    ws = tiny_workspace(tmp_path)
    bundle = make_bundle(ws, tmp_path / "b")
    lm = load_model(ws["model"], device="cpu")
    same = load_sae(lm.model, ws["saes"][0], tokenizer=lm.tokenizer)
    other = load_sae(lm.model, ws["saes"][0], tokenizer=lm.tokenizer, policy="keep_first=0")
    assert validate_bundle(bundle, lm.fingerprint, [same]) == []
    problems = validate_bundle(bundle, lm.fingerprint, [other])
    assert any("position policy mismatch" in p for p in problems), problems
