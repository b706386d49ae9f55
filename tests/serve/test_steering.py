"""The steering toolkit on both engines (tiny model, real servers on 127.0.0.1): presets, conditional edits,
stop conditions, steered and unsteered in one call, and what a latent writes to the logits. Invariants named
in each test; the vLLM engine must also give the torch engine's results (the reference)."""

import json

import httpx
import pytest

from conftest import SAE

pytestmark = pytest.mark.integration

PROMPT = "the cat sat on"
STEER = {"feature": 3, "op": "set", "value": 250.0, "positions": "generated"}


def complete(srv, sae=None, max_tokens=10, top_k=4, **kw):
    sae = dict(sae or {})
    if top_k:
        sae["features"] = {"top_k": top_k}
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, **kw}
    if sae:
        body["sae"] = sae
    r = httpx.post(srv.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_preset_by_name_equals_the_same_edits_inline(server):
    extra = {"feature": 17, "op": "ablate"}
    assert httpx.put(server.url + "/v1/steering/presets/t-steer", json={"edits": [STEER]}).status_code == 200
    try:
        by_name = complete(server, {"preset": "t-steer", "edits": [extra]})
        inline = complete(server, {"edits": [STEER, extra]})  # the preset's edits come first
        assert by_name["choices"] == inline["choices"]
        assert by_name["choices"][0]["text"] != complete(server)["choices"][0]["text"]  # the edit does something
    finally:
        httpx.delete(server.url + "/v1/steering/presets/t-steer")


def test_model_names_that_carry_the_splice_equal_the_explicit_sae_extension(server):
    """Invariant (serve/api/names.py), on both engines: `<model>+sae` is `<model>` with `"mode": "replace"` (the
    paper's spliced model) and `<model>+sae:<preset>` is `<model>` with `"preset"`: same text, logprobs, latents;
    the response names the model as sent."""
    assert httpx.put(server.url + "/v1/steering/presets/t-names", json={"edits": [STEER]}).status_code == 200
    try:
        listed = [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
        assert {"tiny+sae", "a1+sae", "tiny+sae:t-names", "a1+sae:t-names"} <= set(listed)
        for base in ("tiny", "a1"):
            for suffix, sae in (("+sae", {"mode": "replace"}), ("+sae:t-names", {"preset": "t-names"})):
                by_name = complete(server, model=base + suffix, logprobs=2)
                explicit = complete(server, sae, model=base, logprobs=2)
                assert by_name["choices"] == explicit["choices"] and by_name["model"] == base + suffix
        spliced, plain = complete(server, model="tiny+sae", logprobs=2), complete(server, logprobs=2)
        assert spliced["choices"][0]["logprobs"] != plain["choices"][0]["logprobs"]  # the splice does something
    finally:
        httpx.delete(server.url + "/v1/steering/presets/t-names")
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny+sae:t-names", "prompt": PROMPT})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"  # the preset is gone, so is the name


def test_condition_never_holding_is_no_edit_and_always_holding_is_the_edit(server):
    plain, steered = complete(server), complete(server, {"edits": [STEER]})
    assert plain["choices"][0]["text"] != steered["choices"][0]["text"]
    never = complete(server, {"edits": [dict(STEER, when={"feature": 5, "above": 1e6})]})
    always = complete(server, {"edits": [dict(STEER, when={"feature": 5, "above": -1.0})]})
    assert never["choices"] == plain["choices"]
    assert always["choices"] == steered["choices"]


def _first_generated_trigger(choice, after: int = 3) -> tuple[int, float]:
    """A latent and threshold that hold at generated token `after` (its strongest latent, just below its value)."""
    (feats,) = choice["features"]["generated"][after]["features"]
    return feats["indices"][0], feats["values"][0] * 0.999


def test_stop_when_ends_at_the_token_that_sets_it_off(server):
    plain = complete(server)["choices"][0]
    feature, above = _first_generated_trigger(plain)
    got = complete(server, {"stop_when": [{"feature": feature, "above": above}]})
    ch = got["choices"][0]
    assert ch["finish_reason"] == "stop" and plain["text"].startswith(ch["text"])
    assert 1 <= got["usage"]["completion_tokens"] <= 4
    last = ch["features"]["generated"][-1]["features"][0]
    assert dict(zip(last["indices"], last["values"], strict=True)).get(feature, 0.0) > above or \
        len(ch["features"]["generated"]) < 4  # fired earlier, outside that token's top-k list
    assert len(ch["features"]["generated"]) == got["usage"]["completion_tokens"]
    never = complete(server, {"stop_when": [{"feature": feature, "above": 1e6}]})
    assert never["choices"] == complete(server)["choices"]


def test_stop_when_streamed_equals_non_streamed(server):
    plain = complete(server)["choices"][0]
    feature, above = _first_generated_trigger(plain)
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "stream": True,
            "sae": {"stop_when": [{"feature": feature, "above": above}]}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    want = complete(server, {"stop_when": [{"feature": feature, "above": above}]}, top_k=0)["choices"][0]
    assert text == want["text"] and chunks[-1]["choices"][0]["finish_reason"] == "stop"


def _close(a: dict | None, b: dict | None, tol: float = 1e-3) -> bool:
    """The same latents up to float rounding (a batch of other size sums in another order)."""
    if a is None or b is None:
        return a is b
    ta, tb = a["generated"], b["generated"]
    return len(ta) == len(tb) and all(
        x["token_id"] == y["token_id"] and x["features"][0]["indices"] == y["features"][0]["indices"]
        and x["features"][0]["values"] == pytest.approx(y["features"][0]["values"], rel=tol, abs=tol)
        for x, y in zip(ta, tb, strict=True))


def test_compare_equals_two_separate_calls(server):
    sampled = {"temperature": 1.0, "seed": 7}
    both = complete(server, {"edits": [STEER], "compare": True}, n=2, **sampled)
    steered = complete(server, {"edits": [STEER]}, n=2, **sampled)
    unsteered = complete(server, {}, n=2, **sampled)
    for i in range(2):
        got, s, u = both["choices"][i], steered["choices"][i], unsteered["choices"][i]
        assert got["text"] == s["text"] and _close(got["features"], s["features"])
        assert got["unsteered"]["text"] == u["text"] and _close(got["unsteered"]["features"], u["features"])
        assert got["unsteered"]["finish_reason"] == u["finish_reason"]
    assert both["choices"][0]["text"] != both["choices"][0]["unsteered"]["text"]
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 10, "stream": True, **sampled,
            "sae": {"edits": [STEER], "compare": True}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        chunks = [json.loads(ln[6:])["choices"][0] for ln in r.iter_lines() if ln.startswith("data: {")]
    assert "".join(c["text"] for c in chunks) == steered["choices"][0]["text"]
    assert "".join(c.get("unsteered", {}).get("text", "") for c in chunks) == unsteered["choices"][0]["text"]


def test_latent_logits_match_plain_transformers(server, ws):
    """What a latent writes, recomputed with transformers and sae-lens only: decoder row -> final norm -> lm_head."""
    import torch
    from sae_lens import SAE as SaeLensSAE
    from transformers import AutoModelForCausalLM

    got = httpx.get(server.url + f"/v1/saes/{SAE}/features/3", timeout=60).json()["logits"]
    model = AutoModelForCausalLM.from_pretrained(ws["model"], torch_dtype=torch.float32)
    sae = SaeLensSAE.load_from_disk(ws["saes"][0], device="cpu")
    with torch.no_grad():
        logits = model.lm_head(model.model.norm(sae.W_dec[3][None, None]))[0, 0]
    top, low = logits.topk(10), (-logits).topk(10)
    assert [t["token_id"] for t in got["promoted"]] == top.indices.tolist()
    assert [t["token_id"] for t in got["suppressed"]] == low.indices.tolist()
    assert [t["value"] for t in got["promoted"]] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert [t["value"] for t in got["suppressed"]] == pytest.approx((-low.values).tolist(), abs=1e-4)


@pytest.mark.parametrize("sae", [
    {"edits": [dict(STEER, when={"feature": 5, "above": 0.5})]},
    {"edits": [{"feature": 17, "op": "scale", "value": 6.0, "when": {"feature": 17, "above": 1.0}}]},
    {"stop_when": "trigger"},
    {"edits": [STEER], "compare": True},
], ids=["when", "when_self", "stop_when", "compare"])
def test_vllm_engine_matches_torch_engine(sae, torch_server, vllm_server):
    if sae.get("stop_when") == "trigger":
        feature, above = _first_generated_trigger(complete(torch_server)["choices"][0])
        sae = {"stop_when": [{"feature": feature, "above": above}]}
    want, got = complete(torch_server, sae), complete(vllm_server, sae)
    for w, g in zip(want["choices"], got["choices"], strict=True):
        assert g["text"] == w["text"] and g["finish_reason"] == w["finish_reason"]
        assert (g.get("unsteered") or {}).get("text") == (w.get("unsteered") or {}).get("text")
    assert got["usage"] == want["usage"]


def _vector(ws, seed=0):
    """A direction of the tiny model's residual (d_model 128), large enough to change greedy text."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return (torch.randn(128, generator=g) * 3).tolist()


@pytest.mark.parametrize("vec", [{"op": "add", "value": 2.0}, {"op": "project", "value": 3.0, "positions": "generated"},
                                 {"op": "add", "value": 2.0, "when": {"feature": 5, "above": 0.5}}],
                         ids=["add", "project", "when"])
def test_vector_edits_change_the_text_and_the_vllm_engine_matches_torch(vec, ws, torch_server, vllm_server):
    sae = {"vectors": [dict(vec, values=_vector(ws))]}
    want, got = complete(torch_server, sae), complete(vllm_server, sae)
    assert [c["text"] for c in got["choices"]] == [c["text"] for c in want["choices"]]
    assert _close(got["choices"][0]["features"], want["choices"][0]["features"])
    if "when" not in vec:
        assert want["choices"][0]["text"] != complete(torch_server)["choices"][0]["text"]


def test_stored_vector_by_name_equals_inline_values(server, ws):
    v = _vector(ws, seed=1)
    assert httpx.put(server.url + "/v1/steering/vectors/t-vec", json={"values": v}).status_code == 200
    try:
        by_name = complete(server, {"vectors": [{"vector": "t-vec", "value": 2.0}]})
        inline = complete(server, {"vectors": [{"values": v, "value": 2.0}]})
        assert by_name["choices"] == inline["choices"]
    finally:
        httpx.delete(server.url + "/v1/steering/vectors/t-vec")


def test_diffmean_vector_and_auto_steer_on_the_torch_engine(torch_server, vllm_server):
    """Invariants: DiffMean from texts is stored and usable; auto-steer stores a preset that the vLLM engine serves
    like the torch engine; a vLLM server, whose model is not in its process, offers neither (numbers only: a
    text body is a 400; auto-steer is not a route there: 404)."""
    pos = ["the cat sat on the mat", "a big cat ran under a log", "the quick cat jumps over the dog",
           "small red cat sat on a mat"]
    neg = ["the river flows to sea", "sun rises east sets west", "moon night day bright dark", "bird sings in tree"]
    r = httpx.put(torch_server.url + "/v1/steering/vectors/t-dm", json={"positive": pos, "negative": neg}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["source"] == "diffmean" and len(r.json()["values"]) == 128 and r.json()["norm"] > 0
    httpx.delete(torch_server.url + "/v1/steering/vectors/t-dm")
    short = httpx.put(torch_server.url + "/v1/steering/vectors/t-dm", json={"positive": ["cat"], "negative": ["dog"]})
    assert short.status_code == 404  # one token each: the first token stays original, nothing is read (found
    # by schemathesis: a schema-valid request must not get a 400)
    bad = httpx.put(vllm_server.url + "/v1/steering/vectors/t-dm", json={"positive": pos, "negative": neg})
    assert bad.status_code == 400
    r = httpx.post(torch_server.url + "/v1/steering/auto", json={"name": "t-auto", "positive": pos, "negative": neg,
                                                                 "prompts": ["the", "a"]}, timeout=300)
    assert r.status_code == 200, r.text
    body = r.json()
    try:
        assert body["measured"]["method"] in ("latent_add", "diffmean") and len(body["candidates"]) == 8
        preset = httpx.get(torch_server.url + "/v1/steering/presets/t-auto").json()
        assert preset["edits"] or preset["vectors"]
        assert httpx.put(vllm_server.url + "/v1/steering/presets/t-auto",
                         json={k: preset[k] for k in ("mode", "edits", "vectors")}).status_code == 200
        want, got = complete(torch_server, {"preset": "t-auto"}), complete(vllm_server, {"preset": "t-auto"})
        assert [c["text"] for c in got["choices"]] == [c["text"] for c in want["choices"]]
    finally:
        for srv in (torch_server, vllm_server):
            httpx.delete(srv.url + "/v1/steering/presets/t-auto")
    bad = httpx.post(vllm_server.url + "/v1/steering/auto", json={"name": "t-auto", "positive": pos})
    assert bad.status_code == 404
