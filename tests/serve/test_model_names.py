"""Model names that carry the splice (serve/api/names.py), over the fake engine: a request by a derived name
reaches the engine as exactly the request with the `sae` extension it stands for; the listing follows adapters
and presets as they come and go; names that resolve to nothing are 404s in the envelope. (`engine`, `http`:
tests/conftest.py.)"""

import pytest

from saelora.serve.api.names import listing, resolve
from test_http_fake import _envelope

PRESET = {"mode": "error_term", "edits": [{"feature": 3, "op": "set", "value": 5.0}]}


def _ids(c):
    return [m["id"] for m in c.get("/v1/models").json()["data"]]


def _spec(c, engine, **body):
    r = c.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 2, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json(), engine.requests[-1]


def test_the_listing_follows_adapters_and_presets_as_they_come_and_go(http):
    assert _ids(http) == ["fake", "fake+sae"]
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "demo", "lora_path": "demo"}).status_code == 200
    assert http.put("/v1/steering/presets/calm", json=PRESET).status_code == 200
    assert _ids(http) == ["fake", "demo", "fake+sae", "fake+sae:calm", "demo+sae", "demo+sae:calm"]
    cards = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert cards["demo+sae:calm"]["parent"] == "demo" and cards["fake+sae"]["parent"] == "fake"
    assert http.delete("/v1/steering/presets/calm").status_code == 200
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "demo"}).status_code == 200
    assert _ids(http) == ["fake", "fake+sae"]


def test_every_listed_name_resolves_and_a_derived_name_is_the_explicit_sae_extension(http, engine):
    http.post("/v1/load_lora_adapter", json={"lora_name": "demo", "lora_path": "demo"})
    http.put("/v1/steering/presets/calm", json=PRESET)
    for name in _ids(http):
        body, _ = _spec(http, engine, model=name)
        assert body["model"] == name  # the name the client sent, in the response
    for base in ("fake", "demo"):
        model = None if base == "fake" else base
        _, by_name = _spec(http, engine, model=base + "+sae")
        _, explicit = _spec(http, engine, model=model, sae={"mode": "replace"})
        assert by_name == explicit and by_name.splice.modes == {"fake": "replace"}  # the paper's spliced model
        _, by_name = _spec(http, engine, model=base + "+sae:calm")
        _, explicit = _spec(http, engine, model=model, sae={"preset": "calm"})
        assert by_name == explicit and [e.feature for e in by_name.splice.edits] == [3]
        assert by_name.adapter == model


def test_an_sae_field_beside_a_derived_name_adds_to_it_and_its_own_mode_wins(http, engine):
    _, req = _spec(http, engine, model="fake+sae", sae={"features": {"top_k": 2}})
    assert req.splice.modes == {"fake": "replace"} and req.splice.top_k == 2
    _, req = _spec(http, engine, model="fake+sae", sae={"mode": "off"})
    assert req.splice.modes == {"fake": "off"}
    http.put("/v1/steering/presets/calm", json=PRESET)
    r = http.post("/v1/completions", json={"prompt": "a", "model": "fake+sae:calm", "sae": {"preset": "other"}})
    assert _envelope(r, 400)["param"] == "sae.preset"


@pytest.mark.parametrize("name", ["nope", "fake+sae:nope", "fake+sa", "fake+sae:", "fake+sae:a:b", "+sae",
                                  "nope+sae", "fake+sae+sae", "fake+SAE", "fake+sae:../x"])
def test_names_that_resolve_to_nothing_are_404s(http, name):
    for path, body in (("/v1/completions", {"prompt": "a"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]})):
        assert _envelope(http.post(path, json={"model": name, **body}), 404)["param"] == "model"


def test_the_features_route_reads_latents_without_a_splice(http):
    r = http.post("/v1/features", json={"model": "fake+sae", "input": "the cat"})
    assert _envelope(r, 400)["param"] == "model"


def test_a_server_without_an_sae_has_no_derived_names():
    assert listing("m", ["a"], ["p"], has_sae=False) == [("m", "m"), ("a", "a")]
    with pytest.raises(Exception) as e:
        resolve("m+sae", "m", ["a"], ["p"], has_sae=False)
    assert e.value.kind == "not_found"
    assert resolve("a+sae:p", "m", ["a"], ["p"], has_sae=True).adapter == "a"
