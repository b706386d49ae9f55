"""Conditional edits (`LatentEdit.when`) and stop conditions (`RowSpec.stops`) in the splice, on a tiny model
(fast tier). Named invariants: a condition that never holds is no edit; one that always holds is the
unconditional edit; a conditional edit changes exactly the tokens where the condition held; stop hits are
the generated tokens where the watched latent (before edits) is above the threshold."""

import json

import pytest
import torch

from saelora.adapters.edits import Condition, LatentEdit, SpliceError
from saelora.adapters.saes import place_sae
from saelora.adapters.splice import RowSpec, splice_sae
from tiny import make_sae, tiny_llama

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = tiny_llama()
    s = place_sae(model, make_sae("standard", hook=HOOK, seed=0), source="tiny", name="s")
    x = torch.randn(2, 10, s.sae.cfg.d_in) * 3
    pos = torch.arange(10)[None].expand(2, 10)
    z = s.encode(x)
    return s, x, pos, z


def _run(s, x, pos, edits, stops=(), mode="error_term"):
    rows = [RowSpec(edits=list(edits), prompt_len=4, stops=list(stops))] * x.shape[0]
    return splice_sae(s, x, pos, None, rows, mode=mode, dense=True)


def test_condition_that_never_holds_is_no_edit(setup):
    s, x, pos, z = setup
    gate = Condition("s", 5, float(z[..., 5].max()) + 1)
    res = _run(s, x, pos, [LatentEdit("s", 3, "set", 50.0, "all", gate)])
    assert torch.equal(res.out, x)  # error_term without an applied edit: exactly the input
    assert torch.equal(res.dense, z)


@pytest.mark.parametrize("mode", ["error_term", "replace"])
def test_condition_that_always_holds_is_the_unconditional_edit(setup, mode):
    s, x, pos, z = setup
    always = Condition("s", 5, -1.0)  # latents are >= 0
    plain = _run(s, x, pos, [LatentEdit("s", 3, "set", 50.0)], mode=mode)
    gated = _run(s, x, pos, [LatentEdit("s", 3, "set", 50.0, "all", always)], mode=mode)
    assert torch.equal(gated.out, plain.out) and torch.equal(gated.dense, plain.dense)


def test_conditional_edit_changes_exactly_where_the_unedited_latent_is_above(setup):
    s, x, pos, z = setup
    col = z[..., 5]
    above = float(col[col > 0].median()) if bool((col > 0).any()) else -1.0
    held = col > above
    assert bool(held.any()) and not bool(held.all())  # the test must see both cases
    # the condition reads latent 5 before edits, even though an earlier edit sets latent 5 everywhere
    res = _run(s, x, pos, [LatentEdit("s", 5, "set", 0.0), LatentEdit("s", 3, "set", 50.0, "all",
                                                                      Condition("s", 5, above))])
    assert torch.equal(res.dense[..., 3] == 50.0, held | (z[..., 3] == 50.0))
    untouched = _run(s, x, pos, [LatentEdit("s", 3, "set", 50.0, "all", Condition("s", 5, above))])
    assert torch.equal(untouched.out[~held], x[~held]) and not torch.equal(untouched.out[held], x[held])


def test_stop_hits_are_generated_tokens_where_the_latent_is_above(setup):
    s, x, pos, z = setup
    above = float(z[..., 7].median())
    res = _run(s, x, pos, [LatentEdit("s", 7, "set", 0.0)], stops=[Condition("s", 7, above)])
    want = (z[..., 7] > above) & (pos >= 4)  # before the edit; prompt tokens (prompt_len 4) never stop
    assert torch.equal(res.stops, want)
    assert res.stops is not None and _run(s, x, pos, []).stops is None


def test_conditions_round_trip_and_are_checked(setup):
    s, *_ = setup
    e = LatentEdit("s", 3, "add", 1.5, (1, 2), Condition("s", 4, 0.25))
    assert LatentEdit.from_json(json.loads(json.dumps(e.to_json()))) == e
    from saelora.adapters.splice import check_rows
    from saelora.adapters.edits import check_edit
    with pytest.raises(SpliceError, match="own SAE"):  # another SAE that exists: not supported
        check_edit(LatentEdit("s", 3, "set", 1.0, "all", Condition("other", 4, 0.0)), 64)
    for bad, msg in [(LatentEdit("s", 3, "set", 1.0, "all", Condition("other", 4, 0.0)), "Unknown SAE"),
                     (LatentEdit("s", 3, "set", 1.0, "all", Condition("s", 10**6, 0.0)), "outside"),
                     (LatentEdit("s", 3, "set", 1.0, "all", Condition("s", 4, float("nan"))), "finite")]:
        with pytest.raises(SpliceError, match=msg):
            check_rows({"s": s}, [RowSpec(edits=[bad])])
    with pytest.raises(SpliceError, match="outside"):
        check_rows({"s": s}, [RowSpec(stops=[Condition("s", 10**6, 0.0)])])
