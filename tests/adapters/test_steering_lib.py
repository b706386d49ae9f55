"""Steering library on tiny random models (fast tier): concept search, calibrated units, vector edits in the
splice, DiffMean against an independent computation, the judge, and auto-steer reproducing its own score."""

import math

import pytest
import torch

from saelora.adapters.edits import (LatentEdit, SpliceError, SpliceNotFoundError, VectorEdit, changes_stream,
                                   check_edit, edit_from_json)
from saelora.adapters.search import LatentTally, rank_latents
from saelora.adapters.units import SteerScales, UnitError, to_raw


def _tally(tokens: int, firing: dict[int, tuple[float, float]]) -> LatentTally:
    """`tokens` tokens; latent i fires on a fraction f of them with value v, for firing[i] = (f, v)."""
    t = LatentTally()
    for n in range(tokens):
        t.add_token([(i, v) for i, (f, v) in firing.items() if n < f * tokens])
    return t


def test_search_finds_the_planted_latent_where_the_raw_difference_picks_the_always_on_one():
    # 7: the planted concept latent (small scale, specific); 3: fires on every token with a huge scale that
    # differs a little between the sets (the attention-sink-like latent the old contrast picked)
    a = _tally(200, {7: (0.5, 2.0), 3: (1.0, 3300.0), 5: (0.1, 1.0)})
    b = _tally(400, {7: (0.02, 2.0), 3: (1.0, 3200.0), 5: (0.1, 1.0)})
    assert rank_latents(a, b, "mean_diff")[0].feature == 3  # the old ranking's failure, kept by name
    for ranking in ("smd", "freq"):
        top = rank_latents(a, b, ranking)
        assert top[0].feature == 7, ranking
        assert all(r.feature != 3 for r in top)  # denser than max_density on B: excluded
    with pytest.raises(ValueError):
        rank_latents(a, b, "nope")


def test_units_convert_to_raw_values():
    sc = SteerScales(max_act=[10.0, 50.0], dec_norm=[0.5, 2.0], resid_norm=144.0)
    assert to_raw(3.0, "raw", None, feature=1) == 3.0
    assert to_raw(2.0, "max", sc, feature=1) == 100.0
    assert to_raw(0.5, "norm", sc, feature=0) == pytest.approx(0.5 * 144 / 0.5)  # the change of x is 0.5 x norm
    v = [3.0, 4.0]
    assert to_raw(0.25, "norm", sc, vector=v) * 5.0 == pytest.approx(0.25 * 144)  # |value x v| = 0.25 x norm
    with pytest.raises(UnitError):
        to_raw(1.0, "max", sc, vector=v)  # a vector has no max activation
    assert to_raw(3.0, "norm", None, vector=v, op="project") == 3.0  # project's value is a pure multiplier
    assert to_raw(0.5, "norm", sc, vector=[0.0, 0.0]) == 0.0  # an all-zero direction adds nothing
    with pytest.raises(UnitError):
        to_raw(1.0, "norm", None, feature=0)  # no scales: no calibrated unit
    with pytest.raises(UnitError):
        to_raw(1.0, "furlong", sc, feature=0)
    with pytest.raises(UnitError):
        SteerScales.from_descriptions({"features": [{"max": 1.0}]}, "s")  # descriptions written before the units


def test_vector_edit_checks_and_json_round_trip():
    e = VectorEdit("s", (1.0, 0.0, 2.0), "project", 3.0, (1, 2), None)
    assert edit_from_json(e.to_json()) == e
    latent = LatentEdit("s", 4, "add", 1.0)
    assert edit_from_json(latent.to_json()) == latent
    check_edit(e, d_sae=8, d_in=3)
    with pytest.raises(SpliceNotFoundError):  # another width: a direction this hook does not have (404)
        check_edit(VectorEdit("s", (1.0, 0.0), "add"), d_sae=8, d_in=3)
    for bad in (VectorEdit("s", (math.nan, 0.0, 1.0), "add"), VectorEdit("s", (1.0, 0.0, 1.0), "rotate")):
        with pytest.raises(SpliceError):
            check_edit(bad, d_sae=8, d_in=3)
    check_edit(VectorEdit("s", (0.0, 0.0, 0.0), "project"), d_sae=8, d_in=3)  # all zeros: allowed, does nothing
    assert changes_stream("off", [e], "s") and not changes_stream("off", [latent], "s")  # a vector acts in any mode
    assert not changes_stream("error_term", [e], "other")


def _loaded(llama):
    from saelora.adapters.policy import PositionPolicy
    from saelora.adapters.saes import place_sae
    from tiny import make_sae

    return place_sae(llama, make_sae("topk"), "tiny", policy=PositionPolicy(keep_first=True))


def test_vector_edits_in_the_splice_are_the_formulas_at_the_masked_positions(llama):
    from saelora.adapters.splice import RowSpec, splice_sae

    sae = _loaded(llama)
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    pos = torch.arange(5)[None].expand(2, 5)
    v = torch.randn(32)
    rows = [RowSpec(edits=[VectorEdit(sae.name, tuple(v.tolist()), "add", 2.0, "generated")], prompt_len=3),
            RowSpec(edits=[VectorEdit(sae.name, tuple(v.tolist()), "project", 4.0)])]
    out = splice_sae(sae, x, pos, None, rows, mode="error_term").out
    assert torch.equal(out[:, 0], x[:, 0])  # position 0 is kept by the policy: never steered
    assert torch.equal(out[0, :3], x[0, :3])  # "generated": prompt positions untouched
    assert torch.allclose(out[0, 3:], x[0, 3:] + 2.0 * v, atol=1e-5)
    u = v / v.norm()
    assert torch.allclose(out[1, 1:], x[1, 1:] + 4.0 * (x[1, 1:] @ u)[:, None] * u, atol=1e-4)
    zero = [RowSpec(edits=[VectorEdit(sae.name, (0.0,) * 32, "project", 5.0)])]
    assert torch.equal(splice_sae(sae, x[:1], pos[:1], None, zero, mode="error_term").out, x[:1])
    off = splice_sae(sae, x[:1], pos[:1], None, [RowSpec(modes={sae.name: "off"}, edits=rows[0].edits,
                                                         prompt_len=3)], mode="off").out
    assert torch.allclose(off[0, 3:], x[0, 3:] + 2.0 * v, atol=1e-5)  # in mode off, only the vector acts


def test_diffmean_equals_the_mean_residuals_computed_directly(llama):
    from saelora.adapters.activations import run_to_hook
    from saelora.adapters.steering import diffmean, read_texts
    from tiny import tiny_text_corpus, tiny_tokenizer

    docs = tiny_text_corpus(40)
    tok = tiny_tokenizer(docs)
    model = llama
    sae = _loaded(model)
    pos_t, neg_t = docs[:6], docs[6:14]
    got = diffmean(read_texts(model, tok, sae, pos_t, max_len=16), read_texts(model, tok, sae, neg_t, max_len=16))

    def mean(texts):  # one text at a time, position 0 left out (the policy keeps it)
        xs = [run_to_hook(model, sae.hook, torch.tensor([tok(t)["input_ids"][:16]]))[0, 1:] for t in texts]
        return torch.cat(xs).mean(0)
    assert torch.allclose(got, mean(pos_t) - mean(neg_t), atol=1e-4)


def test_spread_is_the_rms_distance_from_the_mean_residual(llama):
    """The scale auto-steer's strengths are in: sqrt(mean |x - mean x|^2) over spliced positions."""
    from saelora.adapters.activations import run_to_hook
    from saelora.adapters.steering import read_texts, spread
    from tiny import tiny_text_corpus, tiny_tokenizer

    docs = tiny_text_corpus(20)
    tok = tiny_tokenizer(docs)
    sae = _loaded(llama)
    with torch.no_grad():
        xs = torch.cat([run_to_hook(llama, sae.hook, torch.tensor([tok(t)["input_ids"][:16]]))[0, 1:]
                        for t in docs[:8]])
    want = (xs - xs.mean(0)).square().sum(-1).mean().sqrt()
    assert spread(read_texts(llama, tok, sae, docs[:8], max_len=16)) == pytest.approx(float(want), rel=1e-4)


def test_a_sweep_in_one_batch_gives_each_setting_what_it_gets_alone(tmp_path):
    """generate_each: every row carries its own setting's edits (greedy, so the comparison is exact)."""
    from saelora.adapters.models import load_model
    from saelora.adapters.saes import load_sae
    from saelora.adapters.splice_hooks import Splice
    from saelora.adapters.steer_score import generate, generate_each
    from tiny import tiny_workspace

    ws = tiny_workspace(tmp_path)
    lm = load_model(ws["model"], device="cpu")
    sae = load_sae(lm.model, ws["saes"][0], tokenizer=lm.tokenizer)
    sp = Splice(lm.model, [sae], mode="error_term").install()
    d = sae.sae.W_dec.shape[1]
    settings = [[], [LatentEdit(sae.name, 3, "add", 40.0)], [VectorEdit(sae.name, (1.0,) * d, "add", 8.0)]]
    prompts = ["the", "a big cat"]
    both = generate_each(lm, sp, prompts, settings, max_new=5, temperature=0)
    alone = [generate(lm, sp, prompts, s, max_new=5, temperature=0) for s in settings]
    assert [[g.ids for g in gens] for gens in both] == [[g.ids for g in gens] for gens in alone]
    assert [g.ids for g in both[0]] != [g.ids for g in both[2]]  # the settings do differ


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_continuation_ce_in_a_padded_batch_is_each_rows_own_ce(arch):
    """Left padding, explicit positions and logits for the last positions only change nothing: each row's CE is
    the mean NLL of its generated tokens computed on that row alone; an empty generation gets +inf. (GPT-2's
    absolute positions are where wrong position ids would show; RoPE is blind to a shift.)"""
    from saelora.adapters.steer_score import Generation, continuation_ce
    from tiny import tiny_gpt2, tiny_llama

    llama = tiny_llama() if arch == "llama" else tiny_gpt2()
    with torch.no_grad():  # large position embeddings, so that they would show if they were wrong
        for name, p in llama.named_parameters():
            if "wpe" in name:
                p.mul_(50.0)
    g = torch.Generator().manual_seed(0)
    rows = [(torch.randint(3, 60, (p,), generator=g).tolist(), torch.randint(3, 60, (n,), generator=g).tolist())
            for p, n in ((1, 5), (4, 2), (2, 0), (6, 7), (3, 3))]
    gens = [Generation("", p, n, "") for p, n in rows]
    got = continuation_ce(llama, gens, batch_size=4)  # rows of 6, 6, 2 and 13 tokens, then one of 6
    for (p, n), ce in zip(rows, got, strict=True):
        if not n:
            assert ce == math.inf
            continue
        ids = torch.tensor([p + n])
        logp = llama(input_ids=ids).logits.float().log_softmax(-1)[0, :-1]
        want = -logp[len(p) - 1:, :].gather(-1, ids[0, len(p):, None]).mean()
        assert ce == pytest.approx(float(want), abs=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_cdf_sampler_draws_from_the_tempered_softmax(temperature):
    """Invariant: each token's frequency is softmax(scores / T) (20k rows, 3 standard errors); a token of
    probability 0 is never drawn; what comes back is -inf except at the one drawn token."""
    from saelora.adapters.steer_score import CdfSampler

    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    scores = p.log().expand(20000, 4).clone()
    torch.manual_seed(0)
    out = CdfSampler(temperature)(None, scores)
    assert ((out == 0).sum(-1) == 1).all() and torch.isinf(out).sum() == 3 * 20000
    freq = (out == 0).float().mean(0)
    want = torch.softmax(scores[0] / temperature, -1)
    assert freq[3] == 0 and torch.all((freq - want).abs() <= 3 * (want * (1 - want) / 20000).sqrt() + 1e-9)


def test_judge_tells_concepts_apart_and_reports_its_accuracy():
    from saelora.adapters.judge import Judge

    music = ["the band played a song on the guitar", "she sings in the choir and plays piano", "a concert with drums"]
    food = ["we cooked pasta with tomato sauce", "bread and cheese for lunch", "a bowl of soup with garlic"]
    other = ["the train left the station late", "he painted the fence on monday", "they moved to a new flat"]
    judge = Judge.fit({"music": music * 3, "food": food * 3}, other * 3, min_df=1)
    p = judge.probs(["a song for the guitar", "soup with bread and cheese"])
    assert p[0, 0] > 0.5 > p[0, 1] and p[1, 1] > 0.5 > p[1, 0]
    acc = judge.accuracy({"music": music, "food": food}, other)
    assert acc["music"]["recall"] == 1.0 and acc["food"]["false_positive"] == 0.0


def test_judge_features_are_unit_tf_idf_rows():
    """The sparse features are (1 + log count) x idf per word in the vocabulary, scaled to unit length; a text
    with no known word is all zeros."""
    from saelora.adapters.judge import _features

    vocab = {"cat": 0, "dog": 1, "sun": 2}
    idf = torch.tensor([1.0, 2.0, 3.0])
    x = _features(["cat cat dog", "the moon", "sun"], vocab, idf).to_dense()
    want = torch.tensor([(1 + math.log(2)) * 1.0, 2.0, 0.0])
    assert torch.allclose(x[0], want / want.norm())
    assert torch.equal(x[1], torch.zeros(3)) and torch.allclose(x[2], torch.tensor([0.0, 0.0, 1.0]))


def test_auto_steer_stores_what_reproduces_its_reported_score(tmp_path):
    """The winner's edits, generated again with the same prompts, seed and judge, give the same summary (the
    confirmation run, seed + 1); and spread-unit strengths are stated in norm units."""
    from saelora.adapters.autosteer import auto_steer, sentences
    from saelora.adapters.judge import Judge
    from saelora.adapters.models import load_model
    from saelora.adapters.saes import load_sae
    from saelora.adapters.splice_hooks import Splice
    from saelora.adapters.steer_score import continuation_ce, generate, reference_ce, score
    from tiny import tiny_workspace

    ws = tiny_workspace(tmp_path)
    lm = load_model(ws["model"], device="cpu")
    sae = load_sae(lm.model, ws["saes"][0], tokenizer=lm.tokenizer)
    pos = ["the cat sat on the mat . the cat ran .", "a big cat sat under a red log ."] * 3
    neg = ["the river flows to sea . the sun rises east .", "moon night day bright dark sea ."] * 3
    prompts = ["the", "a big"]
    sp = Splice(lm.model, [sae], mode="error_term").install()
    res = auto_steer(lm, sp, sae, pos, neg, prompts=prompts, samples=2, max_new=6)
    assert res.edits and res.measured["method"] in ("latent_add", "diffmean") and len(res.candidates) == 8
    gens = generate(lm, sp, prompts, res.edits, samples=2, max_new=6, temperature=0.7, seed=1)
    sp.remove()
    ce, ref = continuation_ce(lm.model, gens), reference_ce(lm.model, lm.tokenizer, pos)
    judge = Judge.fit({"concept": sentences(pos)}, negatives=sentences(neg))
    again = score(gens, ce, judge, "concept", ref).summary()
    assert {k: round(v, 4) for k, v in again.items() if k != "n"} == \
        {k: v for k, v in res.measured.items() if k in again and k != "n"}


def test_auto_steer_picks_the_method_by_its_mean_then_its_strongest_fluent_setting():
    """method_mean: one lucky setting of a weak method does not win; the winning method's strongest setting
    within the gap bound (less the margin) and distinct-2 bound is taken."""
    from saelora.adapters.autosteer import PICKS, Candidate

    def cand(method, feature, strength, concept, gap, distinct=0.9):
        return Candidate(method, strength, [], {"concept": concept, "fluency_gap": gap, "distinct2": distinct,
                                                "success": concept}, feature)
    cands = [cand("latent_add", 7, 0.3, 0.2, -0.5), cand("latent_add", 7, 0.4, 1.0, 0.0),
             cand("latent_add", 7, 0.5, 0.1, 0.9),  # mean 0.43, one lucky 1.0
             cand("diffmean", None, 0.3, 0.6, -0.4), cand("diffmean", None, 0.4, 0.7, 0.2),
             cand("diffmean", None, 0.5, 0.8, 0.45)]  # mean 0.7; 0.5 is past 0.5 - 0.2
    best = PICKS["method_mean"](cands, 0.5)
    assert (best.method, best.strength) == ("diffmean", 0.4)
    assert PICKS["success"](cands, 0.5).feature == 7  # the old rule takes the lucky setting
    broken = [cand("diffmean", None, s, 0.9, 2.0) for s in (0.3, 0.4)]
    assert PICKS["method_mean"](broken, 0.5).strength == 0.3  # nothing within the bounds: the weakest
