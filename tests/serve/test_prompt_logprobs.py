"""Prompt log-probabilities (`echo` with `logprobs`, `max_tokens: 0`, vLLM's `prompt_logprobs`), on both engines
behind real servers: what lm-eval-harness's `local-completions` scores loglikelihood tasks with.

Invariant: a prompt token's logprob is the one a direct forward pass gives it under the request's model: the
base model (plain transformers), the adapter (PEFT's model from the bundle), the splice (`<model>+sae`: the
library's hooks in `replace` mode), a steered preset; the first token has none."""

import json

import httpx
import pytest

from direct import STEER, Direct

pytestmark = pytest.mark.integration
IDS = [5, 9, 14, 3, 22, 7, 11, 30]  # a prompt as token ids: no tokenizer between the two sides
TOL = 2e-3


def _post(server, **body):
    r = httpx.post(server.url + "/v1/completions", json={"temperature": 0, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


@pytest.fixture(scope="module")
def direct(ws):
    """Reference next-token logprobs of IDS from a direct forward pass, by model name."""
    ref = Direct(ws)
    return {name: ref.logprobs(name, IDS) for name in ("tiny", "a1", "tiny+sae", "tiny+sae:t-echo")}


def _close(got, want):
    assert got[0] is None and want[0] is None and len(got) == len(want)
    assert got[1:] == pytest.approx(want[1:], rel=TOL, abs=TOL)


def test_echoed_prompt_scores_equal_a_direct_forward_under_each_model_name(server, direct):
    assert httpx.put(server.url + "/v1/steering/presets/t-echo", json={"edits": [STEER]}).status_code == 200
    try:
        for name, want in direct.items():
            c = _post(server, model=name, prompt=IDS, echo=True, logprobs=1, max_tokens=0)
            lp = c["logprobs"]
            assert c["finish_reason"] == "length" and len(lp["tokens"]) == len(IDS)
            _close(lp["token_logprobs"], want)
            assert lp["top_logprobs"][0] is None and all(len(t) == 1 for t in lp["top_logprobs"][1:])
            assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    finally:
        httpx.delete(server.url + "/v1/steering/presets/t-echo")
    assert direct["tiny+sae"][1:] != pytest.approx(direct["tiny"][1:], abs=1e-2)  # the splice changes the scores


def test_echo_with_a_completion_is_the_prompt_then_the_same_completion(server):
    plain = _post(server, model="tiny", prompt=IDS, logprobs=2, max_tokens=4)
    echoed = _post(server, model="tiny", prompt=[IDS], echo=True, logprobs=2, max_tokens=4)  # lm-eval's batch shape
    assert echoed["text"].endswith(plain["text"]) and len(echoed["text"]) > len(plain["text"])
    n = len(IDS)
    assert echoed["logprobs"]["tokens"][n:] == plain["logprobs"]["tokens"]
    assert echoed["logprobs"]["token_logprobs"][n:] == pytest.approx(plain["logprobs"]["token_logprobs"], abs=1e-5)


def test_vllms_prompt_logprobs_extension_carries_ranks_and_the_same_scores(server, direct):
    c = _post(server, model="tiny", prompt=IDS, prompt_logprobs=3, max_tokens=1)
    pl = c["prompt_logprobs"]
    assert pl[0] is None and len(pl) == len(IDS)
    got = [None] + [pl[j][str(t)]["logprob"] for j, t in enumerate(IDS) if j]
    _close(got, direct["tiny"])
    for j, entry in enumerate(pl[1:], 1):
        own = entry[str(IDS[j])]
        assert own["rank"] >= 1 and len(entry) in (3, 4)  # the top 3, and the prompt's token when not among them
        assert sum(e["logprob"] > own["logprob"] + 1e-6 for e in entry.values()) <= own["rank"] - 1


def test_a_streamed_echo_sends_the_prompt_first_and_concatenates_to_the_response(server):
    body = {"model": "tiny", "prompt": IDS, "echo": True, "logprobs": 1, "max_tokens": 3, "temperature": 0}
    whole = _post(server, **body)
    chunks = []
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:])["choices"][0])
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert chunks[0]["logprobs"]["tokens"] == whole["logprobs"]["tokens"][:len(IDS)]


def test_max_tokens_zero_without_echo_is_an_empty_completion(server):
    c = _post(server, model="tiny", prompt=IDS, max_tokens=0)
    assert (c["text"], c["finish_reason"]) == ("", "length")


def test_n_choices_of_one_prompt_carry_the_same_prompt_scores(server, direct):
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": IDS, "echo": True, "logprobs": 1,
                                                         "max_tokens": 2, "n": 2, "temperature": 1.0, "seed": 3},
                   timeout=120)
    assert r.status_code == 200, r.text
    for c in r.json()["choices"]:
        _close(c["logprobs"]["token_logprobs"][:len(IDS)], direct["tiny"])
