"""Property tests (Hypothesis) on the request models: any JSON either validates or raises pydantic's
ValidationError (never another exception, so the server answers 400, not 500), and whatever validates is inside
the documented bounds."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from saelora.clients import protocol as P

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                    max_leaves=12)
FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stop", "seed", "sae",
          "logprobs", "echo", "messages", "input", "max_completion_tokens", "top_logprobs"]
EDIT = st.fixed_dictionaries({}, optional={"sae": JSON, "feature": JSON | st.integers(-5, 5),
                                           "op": st.sampled_from(["set", "add", "scale", "clamp_max", "ablate", "x"]),
                                           "value": JSON | st.floats(), "positions": JSON})
BODY = st.fixed_dictionaries({}, optional={f: JSON for f in FIELDS}) | st.fixed_dictionaries(
    {"prompt": st.text(min_size=1, max_size=5)},
    optional={"seed": st.integers(), "temperature": st.floats(), "top_p": st.floats(), "n": JSON,
              "sae": st.fixed_dictionaries({}, optional={"edits": st.lists(EDIT, max_size=3), "mode": JSON})})


def _validate(model, body):
    try:
        return model.model_validate(body)
    except ValidationError:
        return None


@settings(max_examples=400, deadline=None)
@given(BODY)
def test_completion_requests_validate_or_raise_validation_error_only(body):
    r = _validate(P.CompletionRequest, body)
    if r is None:
        return
    assert 0 <= r.temperature <= 2 and 0 < r.top_p <= 1 and math.isfinite(r.temperature)
    assert r.seed is None or 0 <= r.seed <= P.MAX_SEED
    assert 1 <= r.n <= P.MAX_N and (r.max_tokens is None or r.max_tokens >= 1)
    assert not isinstance(r.stream, int) or isinstance(r.stream, bool)
    for e in (r.sae.edits if r.sae else []):
        assert math.isfinite(e.value) and abs(e.value) <= P.MAX_EDIT_VALUE and e.feature >= 0
        assert isinstance(e.positions, str) or 1 <= len(e.positions) <= P.MAX_POSITIONS


@settings(max_examples=300, deadline=None)
@given(BODY)
def test_chat_and_features_requests_validate_or_raise_validation_error_only(body):
    chat = _validate(P.ChatCompletionRequest, body)
    if chat is not None:
        assert chat.messages and (chat.top_logprobs is None or 0 <= chat.top_logprobs <= P.MAX_LOGPROBS)
    feats = _validate(P.FeaturesRequest, body)
    if feats is not None:
        assert (feats.input is None) != (feats.messages is None)


@given(st.text(max_size=80))
def test_adapter_names_accepted_are_safe(name):
    try:
        P.LoadLoRARequest(lora_name=name, lora_path="p")
    except ValidationError:
        return
    assert 1 <= len(name) <= 64 and all(c.isascii() and (c.isalnum() or c in "_-") for c in name)
