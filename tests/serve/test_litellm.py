"""litellm, a client that sends only `model`, messages and sampling fields, reaches the splice through a model
name that carries it (serve/api/names.py), on both engines: the real `litellm` package against a live server
on 127.0.0.1; no network (its model cost map is read from the package)."""

import os

import openai
import pytest

pytestmark = pytest.mark.integration
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # before litellm is imported: no fetch at import
import litellm  # noqa: E402 - a dev dependency: missing, the test fails rather than skips
MESSAGES = [{"role": "user", "content": "the cat sat on"}]


def test_litellm_chat_by_a_spliced_name_equals_the_openai_sdk_with_the_sae_extension(server):
    """Invariant: litellm's `openai/<model>+sae` gives the text the openai SDK gets for `<model>` with
    `"sae": {"mode": "replace"}`; and its `openai/<adapter>` the adapter's."""
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    for model in ("tiny", "a1"):
        got = litellm.completion(model=f"openai/{model}+sae", messages=MESSAGES, api_base=server.url + "/v1",
                                 api_key="unused", max_tokens=6, temperature=0)
        want = oa.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0,
                                          extra_body={"sae": {"mode": "replace"}})
        assert got.choices[0].message.content == want.choices[0].message.content
        plain = litellm.completion(model=f"openai/{model}", messages=MESSAGES, api_base=server.url + "/v1",
                                   api_key="unused", max_tokens=6, temperature=0)
        assert plain.choices[0].message.content == oa.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=6, temperature=0).choices[0].message.content


def test_litellm_text_completion_by_a_spliced_name(server):
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    got = litellm.text_completion(model="text-completion-openai/tiny+sae", prompt="the cat sat on",
                                  api_base=server.url + "/v1", api_key="unused", max_tokens=6, temperature=0)
    want = oa.completions.create(model="tiny", prompt="the cat sat on", max_tokens=6, temperature=0,
                                 extra_body={"sae": {"mode": "replace"}})
    assert got.choices[0].text == want.choices[0].text
