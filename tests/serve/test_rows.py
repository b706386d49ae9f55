"""The row core (serve/core/rows.py), driven the way an engine drives it: `take` a sampled token, `add_latents` /
`add_stop` at a position, `read_through` a position, `flush`. Both engines feed it these and nothing else, so
these invariants hold on both."""

from saelora.adapters.edits import Condition
from saelora.adapters.splice import RowSpec
from saelora.serve.core.engine import (EngineError, Finished, GenerationRequest, PromptFeatures, Sampling,
                                       TokenEvent)
from saelora.serve.core.rows import RowState, context_limit
from tiny import WORDS, tiny_tokenizer

TOK = tiny_tokenizer([" ".join(WORDS)])
EOS = {TOK.eos_token_id}


def _row(top_k=0, stops=(), max_tokens=4, include_prompt=False, stop=(), prompt=(5, 6, 7)):
    events = []
    req = GenerationRequest(list(prompt), Sampling(max_tokens=max_tokens, stop=list(stop)),
                            RowSpec(modes={"s": "error_term"}, top_k=top_k, include_prompt=include_prompt,
                                    stops=list(stops), prompt_len=len(prompt)))
    return RowState(req, events.append, TOK, EOS, ["s"]), events


def test_without_latents_a_token_goes_out_at_once_and_max_tokens_ends_with_length():
    row, ev = _row(max_tokens=2)
    row.take(9)
    assert not row.flush() and [type(e) for e in ev] == [TokenEvent] and ev[0].position == 3
    row.take(10)
    assert row.flush() and row.done and isinstance(ev[-1], Finished)
    assert (ev[-1].finish_reason, ev[-1].completion_tokens) == ("length", 2)


def test_with_latents_a_token_waits_until_its_position_is_read():
    row, ev = _row(top_k=2, max_tokens=2)
    row.read_through(2)  # the prompt was read
    row.take(9)
    assert not row.flush() and ev == []  # sampled, not yet fed back
    row.add_latents("s", 3, [4, 1, 0], [2.5, 1.0, 0.0])
    row.read_through(3)
    assert not row.flush() and ev[0].features == {"s": ([4, 1], [2.5, 1.0])}  # cut to top_k
    row.take(10)  # the last token: the row has its reason, yet waits one more read for the latents
    assert not row.flush() and row.reason == "length" and len(ev) == 1
    row.add_latents("s", 4, [3], [0.5])
    row.read_through(4)
    assert row.flush() and ev[1].features == {"s": ([3], [0.5])} and isinstance(ev[2], Finished)


def test_eos_ends_with_stop_and_is_not_shown():
    row, ev = _row()
    row.take(9)
    row.take(TOK.eos_token_id)
    assert row.flush() and [type(e) for e in ev] == [TokenEvent, Finished] and ev[-1].finish_reason == "stop"
    assert ev[-1].completion_tokens == 2  # EOS counts as generated, as in OpenAI's usage


def test_a_stop_when_hit_truncates_what_was_sampled_ahead():
    row, ev = _row(stops=[Condition("s", 1, 0.5)], max_tokens=8)
    for tok in (9, 10, 11):  # an engine that samples ahead (vLLM) has three tokens out before their reads
        row.take(tok)
    row.add_stop(4)  # the second generated token set off the watched latent
    row.read_through(5)
    assert row.flush()
    tokens = [e for e in ev if isinstance(e, TokenEvent)]
    assert [e.position for e in tokens] == [3, 4] and ev[-1].finish_reason == "stop"
    assert ev[-1].completion_tokens == 2
    row.take(12)  # a token that arrives after the end is ignored
    assert len(ev) == 3


def test_prompt_latents_come_first_once_the_prompt_is_read():
    row, ev = _row(top_k=1, include_prompt=True)
    assert not row.flush() and ev == []
    for p in range(3):
        row.add_latents("s", p, [p], [1.0])
    row.read_through(2)
    row.flush()
    assert isinstance(ev[0], PromptFeatures) and [t.features["s"][0] for t in ev[0].tokens] == [[0], [1], [2]]


def test_final_flush_sends_what_is_pending_and_ends_with_length():
    row, ev = _row(top_k=1)
    row.take(9)
    assert row.flush(final=True) and ev[0].features == {} and ev[-1].finish_reason == "length"


def test_a_failed_row_ends_with_an_internal_error_and_gives_its_adapter_back():
    class Registry:
        held = 0

        def acquire(self, name): Registry.held += 1

        def release(self, name): Registry.held -= 1

    row, ev = _row()
    row.hold(Registry())
    row.fail(RuntimeError("boom"))
    row.fail(RuntimeError("again"))
    assert Registry.held == 0 and row.done and isinstance(ev[0], EngineError) and ev[0].kind == "internal"


def test_context_limit_is_the_models_positions_less_what_an_engine_reserves():
    class Cfg:
        max_position_embeddings = 256

    assert context_limit(Cfg(), None) == 256 and context_limit(Cfg(), 100) == 100
    assert context_limit(Cfg(), None, reserve=1) == 255 and context_limit(Cfg(), 999, reserve=1) == 255


SAES = [{"name": "s", "d_sae": 16, "d_in": 8}]


def _checked(spec, prompt=(5, 6, 7), max_tokens=4):
    from saelora.serve.core.engine import check_request

    return check_request(GenerationRequest(list(prompt), Sampling(max_tokens=max_tokens), spec), SAES, 100, 64)


def test_the_admission_check_returns_the_spec_an_engine_receives_and_a_row_takes_only_a_checked_one():
    import pytest

    req = GenerationRequest([5, 6, 7], Sampling(max_tokens=2), RowSpec(modes={"s": "off"}, top_k=2))
    with pytest.raises(ValueError, match="checked request"):
        RowState(req, [].append, TOK, EOS, ["s"])  # an engine cannot skip the admission check
    checked = _checked(req.splice)
    assert checked.splice.prompt_len == 3 and req.splice.prompt_len is None  # a new spec; the caller's untouched
    assert RowState(checked, [].append, TOK, EOS, ["s"]).spec is checked.splice  # the same object, no new shape


def test_the_admission_check_maps_each_bad_spec_to_its_kind_and_param():
    import pytest

    from saelora.adapters.edits import LatentEdit

    bad = [(RowSpec(modes={"other": "off"}), "not_found", "sae.mode"),
           (RowSpec(modes={"s": "sideways"}), "invalid", "sae.mode"),
           (RowSpec(report=["other"]), "not_found", "sae.features.saes"),
           (RowSpec(top_k=-1), "invalid", "sae.features.top_k"),
           (RowSpec(edits=[LatentEdit("s", 99, "set", 1.0)]), "not_found", "sae")]
    for spec, kind, param in bad:
        with pytest.raises(EngineError) as e:
            _checked(spec)
        assert (e.value.kind, e.value.param) == (kind, param), spec
    with pytest.raises(EngineError) as e:
        _checked(RowSpec(), max_tokens=62)
    assert e.value.kind == "context_length"


def test_a_row_spec_crosses_a_process_boundary_unchanged():
    from saelora.adapters.edits import LatentEdit

    spec = RowSpec(modes={"s": "replace"}, edits=[LatentEdit("s", 3, "add", 2.0, when=Condition("s", 4, 0.5))],
                   prompt_len=3, stops=[Condition("s", 1, 0.0)], top_k=2, include_prompt=True, report=["s"])
    assert RowSpec.from_json(spec.to_json()) == spec


def test_prompt_scores_go_out_first_once_every_position_is_in_and_max_tokens_zero_samples_nothing():
    from saelora.serve.core.engine import PromptLogprobs

    events = []
    req = GenerationRequest([5, 6, 7], Sampling(max_tokens=0, prompt_logprobs=1),
                            RowSpec(modes={"s": "error_term"}, prompt_len=3))
    row = RowState(req, events.append, TOK, EOS, ["s"])
    row.add_prompt_scores(0, [None, (-1.0, 2, [(4, -0.5)])])  # a first chunk of a chunked prefill
    assert not row.flush() and events == []  # position 2 is not scored yet
    row.take(9)  # an engine that samples anyway (vLLM: at least one token): ignored
    row.add_prompt_scores(2, [(-2.0, 1, [(7, -2.0)])])
    assert row.flush() and [type(e) for e in events] == [PromptLogprobs, Finished]
    assert events[0].scores == [None, (-1.0, 2, [(4, -0.5)]), (-2.0, 1, [(7, -2.0)])]
    assert (events[1].finish_reason, events[1].completion_tokens) == ("length", 0)
    assert row.flush() and len(events) == 2  # a finished row emits nothing more


def test_max_tokens_zero_without_scores_is_an_empty_completion():
    from saelora.serve.core.engine import check_request

    req = check_request(GenerationRequest([5, 6], Sampling(max_tokens=0), RowSpec()), SAES, 100, 64)
    events = []
    row = RowState(req, events.append, TOK, EOS, ["s"])
    assert row.flush() and [type(e) for e in events] == [Finished] and events[0].completion_tokens == 0


def test_prompt_scores_are_each_tokens_logprob_rank_and_top_k():
    import torch

    from saelora.serve.core.sampling import prompt_scores

    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    got = prompt_scores(logits, torch.tensor([2, 0]), k=2)
    lp = torch.log_softmax(logits, -1)
    assert [g[1] for g in got] == [2, 1] and got[0][0] == pytest_approx(float(lp[0, 2]))
    assert [t for t, _ in got[0][2]] == [1, 2] and prompt_scores(logits, torch.tensor([2, 0]), k=0)[1][2] == []


def pytest_approx(x):
    import pytest

    return pytest.approx(x, abs=1e-6)


def test_an_eos_that_ends_a_row_is_not_shown_but_finished_lists_it_for_logprobs():
    row, ev = _row(max_tokens=4)
    row.take(9, -0.5, [(9, -0.5)])
    row.take(TOK.eos_token_id, -0.1, [(TOK.eos_token_id, -0.1)])
    assert row.flush() and [type(e) for e in ev] == [TokenEvent, Finished]
    assert ev[-1].eos.token_id == TOK.eos_token_id and ev[-1].eos.logprob == -0.1 and ev[-1].eos.text == ""
    assert (ev[-1].finish_reason, ev[-1].completion_tokens) == ("stop", 2)
