"""Integration tests: a tiny model behind a real server on 127.0.0.1, driven by the official openai client and
by httpx."""

import asyncio
import json
import os
import threading

import httpx
import openai
import pytest

from saelora.serve.api.app import create_app
from conftest import SAE, make_engine
from server_util import LiveServer, error_body

PROMPTS = ["the cat sat on", "a big red fox jumps over the lazy", "sun rises east", "river flows to"]

pytestmark = pytest.mark.integration


@pytest.fixture
def oa(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _complete(server, prompt, **kw):
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0, **kw}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


# ---- the OpenAI surface -----------------------------------------------------------------------------------

def test_completion_with_openai_client(oa):
    r = oa.completions.create(model="tiny", prompt="the cat sat on", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens == 4 and r.choices[0].text


def test_chat_with_openai_client(oa):
    r = oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the cat"}], max_tokens=5,
                                   temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.usage.completion_tokens == 5


def test_streaming_equals_non_streaming(oa):
    full = oa.completions.create(model="tiny", prompt="the cat sat on", max_tokens=8, temperature=0)
    parts = [c.choices[0].text for c in oa.completions.create(model="tiny", prompt="the cat sat on", max_tokens=8,
                                                                temperature=0, stream=True)]
    assert "".join(parts) == full.choices[0].text
    chat = [c.choices[0].delta.content or "" for c in oa.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "the cat"}], max_tokens=5, temperature=0, stream=True)]
    assert "".join(chat) == oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the cat"}],
                                                      max_tokens=5, temperature=0).choices[0].message.content


def test_sse_ends_with_done(server):
    with httpx.stream("POST", server.url + "/v1/completions", json={"model": "tiny", "prompt": "the cat",
                                                                    "max_tokens": 3, "stream": True,
                                                                    "temperature": 0}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_features_through_extra_body(oa):
    r = oa.completions.create(model="tiny", prompt="the cat sat on", max_tokens=5, temperature=0,
                              extra_body={"sae": {"features": {"top_k": 3, "include_prompt": True}}})
    feats = r.choices[0].model_extra["features"]
    assert len(feats["generated"]) == 5 and len(feats["prompt"]) == 4
    assert [t["position"] for t in feats["prompt"] + feats["generated"]] == list(range(9))
    for t in feats["generated"]:
        (entry,) = t["features"]
        assert entry["sae"] == SAE and 1 <= len(entry["indices"]) <= 3
        assert entry["values"] == sorted(entry["values"], reverse=True)
    streamed = [c.model_extra.get("features") or c.choices[0].model_extra.get("features")
                for c in oa.completions.create(model="tiny", prompt="the cat sat on", max_tokens=5, temperature=0,
                                               stream=True, extra_body={"sae": {"features": {"top_k": 3}}})]
    generated = [t for f in streamed if f for t in f.get("generated", [])]
    assert [t["features"] for t in generated] == [t["features"] for t in feats["generated"]]


def test_encode_only_features_match_generation_prompt_features(server):
    enc = httpx.post(server.url + "/v1/features", json={"model": "tiny", "input": "the cat sat on", "top_k": 3}).json()
    gen = _complete(server, "the cat sat on", max_tokens=1, sae={"features": {"top_k": 3, "include_prompt": True}})
    assert [t["features"] for t in enc["tokens"]] == [t["features"] for t in gen["choices"][0]["features"]["prompt"]]
    assert [t["token"] for t in enc["tokens"]] == ["the", "cat", "sat", "on"]


def test_models_lists_adapters_with_parent(oa, server):
    models = {m.id: m for m in oa.models.list().data}
    assert models["tiny"].model_extra["saes"][0]["name"] == SAE
    assert models["a1"].model_extra["parent"] == "tiny"
    # the context limit a client must stay within: the model's 256 positions, less the one token the vLLM engine
    # asks for beyond max_tokens; one token more is refused as context_length_exceeded
    limit = models["tiny"].model_extra["max_model_len"]
    assert models["a1"].model_extra["max_model_len"] == limit and limit in (255, 256)
    n = _complete(server, "the cat", max_tokens=1)["usage"]["prompt_tokens"]
    body = {"model": "tiny", "prompt": "the cat", "max_tokens": limit - n + 1}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


# ---- splice semantics over HTTP -----------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_error_term_without_edits_equals_off_and_plain(server, prompt):
    plain = _complete(server, prompt)["choices"][0]["text"]
    off = _complete(server, prompt, sae={"mode": "off"})["choices"][0]["text"]
    err = _complete(server, prompt, sae={"mode": "error_term", "features": {"top_k": 2}})["choices"][0]["text"]
    assert plain == off == err
    replaced = _complete(server, prompt, sae={"mode": "replace"})["choices"][0]["text"]
    assert replaced != plain  # the random SAE is lossy


def test_set_edit_steers_and_latents_show_it(server):
    base = _complete(server, "the cat sat on", sae={"features": {"top_k": 3}})["choices"][0]
    steered = _complete(server, "the cat sat on", sae={"features": {"top_k": 3}, "edits": [
        {"feature": 3, "op": "set", "value": 250.0, "positions": "generated"}]})["choices"][0]
    assert steered["text"] != base["text"]
    for t in steered["features"]["generated"]:
        assert t["features"][0]["indices"][0] == 3 and t["features"][0]["values"][0] == 250.0
    top = base["features"]["generated"][0]["features"][0]["indices"][0]
    ablated = _complete(server, "the cat sat on", sae={"features": {"top_k": 3}, "edits": [
        {"sae": SAE, "feature": top, "op": "ablate", "positions": "generated"}]})["choices"][0]
    assert top not in ablated["features"]["generated"][0]["features"][0]["indices"]


def test_batched_rows_with_different_edits_and_adapters_equal_solo(server):
    variants = [("tiny", None), ("a1", None), ("tiny", {"edits": [{"feature": 5, "op": "set", "value": 15.0}]}),
                ("a1", {"edits": [{"feature": 9, "op": "add", "value": 8.0}], "features": {"top_k": 2}}),
                ("tiny", {"mode": "replace"})]
    bodies = [{"model": m, "prompt": PROMPTS[i % 4], "max_tokens": 8, "temperature": 0, **({"sae": s} if s else {})}
              for i, (m, s) in enumerate(variants)]
    solo = [httpx.post(server.url + "/v1/completions", json=b, timeout=60).json()["choices"][0] for b in bodies]

    async def together():
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*[c.post(server.url + "/v1/completions", json=b) for b in bodies])
    batched = [r.json()["choices"][0] for r in asyncio.run(together())]
    assert [b["text"] for b in batched] == [s["text"] for s in solo]
    for got, want in zip(batched[3]["features"]["generated"], solo[3]["features"]["generated"], strict=True):
        assert got["features"][0]["indices"] == want["features"][0]["indices"]  # latents: same ids, values within
        assert got["features"][0]["values"] == pytest.approx(want["features"][0]["values"], rel=1e-4)  # float noise
    assert len({s["text"] for s in solo[:2]}) == 2, "the adapter changes the output"


def test_n_logprobs_and_seeded_sampling(oa):
    r = oa.completions.create(model="tiny", prompt="the cat", max_tokens=4, n=2, temperature=1.0, seed=3, logprobs=2)
    assert len(r.choices) == 2 and len(r.choices[0].logprobs.tokens) == 4
    assert all(len(d) == 2 for d in r.choices[0].logprobs.top_logprobs)
    again = oa.completions.create(model="tiny", prompt="the cat", max_tokens=4, n=2, temperature=1.0, seed=3)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    chat = oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "cat"}], max_tokens=3,
                                      logprobs=True, top_logprobs=2, temperature=0)
    ch = chat.choices[0]
    eos = 1 if ch.finish_reason == "stop" else 0  # EOS counts as a completion token but is not returned
    assert len(ch.logprobs.content) == chat.usage.completion_tokens - eos >= 1
    assert len(ch.logprobs.content[0].top_logprobs) == 2


def test_stop_strings(server):
    full = _complete(server, "the cat sat on", max_tokens=8)["choices"][0]["text"]
    word = full.split()[1]
    r = _complete(server, "the cat sat on", max_tokens=8, stop=[word])["choices"][0]
    assert r["finish_reason"] == "stop" and word not in r["text"] and full.startswith(r["text"])


# ---- adapters: hot swap --------------------------------------------------------------------------------------

def test_load_use_unload_restores_outputs(server):
    before = _complete(server, PROMPTS[1])["choices"][0]["text"]
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "b2", "lora_path": "a2"})
    assert r.status_code == 200, r.text
    with_b2 = _complete(server, PROMPTS[1], model="b2")["choices"][0]["text"]
    assert with_b2 != before
    assert "b2" in [a["name"] for a in httpx.get(server.url + "/v1/adapters").json()["data"]]
    assert httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "b2"}).status_code == 200
    assert _complete(server, PROMPTS[1])["choices"][0]["text"] == before
    assert httpx.post(server.url + "/v1/completions", json={"model": "b2", "prompt": "x"}).status_code == 404


def test_ignore_eos_runs_to_max_tokens_and_keeps_the_greedy_prefix(server):
    """Invariant: `ignore_eos` changes nothing before the EOS; past it the request runs to max_tokens."""
    short = _complete(server, PROMPTS[0], max_tokens=200)["choices"][0]
    assert short["finish_reason"] == "stop"  # the tiny model's greedy text ends at EOS
    long = _complete(server, PROMPTS[0], max_tokens=200, ignore_eos=True)
    assert long["choices"][0]["finish_reason"] == "length" and long["usage"]["completion_tokens"] == 200
    assert long["choices"][0]["text"].startswith(short["text"])


def test_unload_in_use_is_409_and_request_keeps_its_adapter(server):
    """Invariant: an adapter in use cannot be unloaded (409), and the request keeps it to its last token. The
    request runs 200 tokens past EOS (`ignore_eos`), so the unload lands mid-stream: the tiny model's greedy
    text ends at EOS within ~10 tokens, which a fast engine finished before the unload arrived."""
    httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "busy", "lora_path": "a2"}).raise_for_status()
    long = {"max_tokens": 200, "ignore_eos": True}
    solo = _complete(server, PROMPTS[0], model="busy", **long)["choices"][0]
    assert solo["finish_reason"] == "length"
    with httpx.stream("POST", server.url + "/v1/completions", json={"model": "busy", "prompt": PROMPTS[0],
                                                                    "temperature": 0, "stream": True, **long},
                      timeout=60) as r:
        lines = r.iter_lines()
        first = next(ln for ln in lines if ln)
        u = httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "busy"})
        assert u.status_code == 409 and u.json()["error"]["type"] == "conflict_error"
        rest = [first] + [ln for ln in lines if ln]
    text = "".join(json.loads(ln[6:])["choices"][0]["text"] for ln in rest if ln != "data: [DONE]")
    assert text == solo["text"]
    assert httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "busy"}).status_code == 200


def test_hot_swap_under_concurrent_load(server):
    failures, done = [], threading.Event()

    def load():
        with httpx.Client(timeout=60) as c:
            while not done.is_set():
                r = c.post(server.url + "/v1/completions", json={"model": "a1", "prompt": "the cat", "max_tokens": 4})
                if r.status_code != 200 or r.json()["choices"][0]["finish_reason"] not in ("stop", "length"):
                    failures.append(r.text)
    workers = [threading.Thread(target=load) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        for i in range(5):
            assert httpx.post(server.url + "/v1/load_lora_adapter",
                              json={"lora_name": f"hot{i}", "lora_path": "a2"}).status_code == 200
            _complete(server, "the cat", model=f"hot{i}")
            assert httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": f"hot{i}"}).status_code == 200
    finally:
        done.set()
        for w in workers:
            w.join()
    assert failures == []


# ---- errors --------------------------------------------------------------------------------------------------

_err = error_body


@pytest.mark.parametrize("body,param", [
    ({"model": "tiny"}, "prompt"),
    ({"model": "tiny", "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"model": "tiny", "prompt": "x", "n": 99}, "n"),
    ({"model": "tiny", "prompt": "x", "sae": {"mode": "swap"}}, "sae.mode"),
    ({"model": "tiny", "prompt": "x", "sae": {"features": {"top_k": 65}}}, "sae.features.top_k"),
    ({"model": "tiny", "prompt": "x", "sae": {"edits": [{"feature": -1, "op": "set"}]}}, "sae.edits.0.feature"),
    ({"model": "tiny", "prompt": "x", "sae": {"edits": [{"feature": 1, "op": "boost"}]}}, "sae.edits.0.op"),
    ({"model": "tiny", "prompt": "x", "sae": {"edits": [{"feature": 1, "op": "set", "positions": [-1]}]}}, None),
    ({"model": "tiny", "prompt": "x", "sae": {"edits": [{"feature": 1, "op": "set"}] * 65}}, "sae.edits"),
    ({"model": "tiny", "prompt": "x", "sae": {"unknown": 1}}, "sae.unknown"),
])
def test_validation_errors_are_400(server, body, param):
    b = _err(httpx.post(server.url + "/v1/completions", json=body), 400, "invalid_request_error")
    if param:
        assert b["param"].startswith(param)


def test_nan_and_inf_rejected(server):
    for raw in ('{"model": "tiny", "prompt": "x", "temperature": NaN}',
                '{"model": "tiny", "prompt": "x", "sae": {"edits": [{"feature": 1, "op": "set", "value": Infinity}]}}'):
        _err(httpx.post(server.url + "/v1/completions", content=raw, headers={"content-type": "application/json"}),
             400)


def test_engine_level_errors(server):
    _err(httpx.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "x"}), 404, "not_found_error")
    body = _err(httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "sae": {
        "edits": [{"feature": 64, "op": "set"}]}}), 404)  # a latent the SAE does not have: not found, like a model
    assert "outside [0, 64)" in body["message"]
    _err(httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "sae": {
        "edits": [{"sae": "blocks.0.nope", "feature": 1, "op": "set"}]}}), 404)
    body = _err(httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "the " * 200,
                                                                 "max_tokens": 100}), 400)
    assert "maximum context length" in body["message"] and body["code"] == "context_length_exceeded"
    _err(httpx.post(server.url + "/v1/completions", content="{not json", headers={"content-type": "application/json"}),
         400)
    _err(httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": [1, 2, 10**6]}), 400)
    _err(httpx.get(server.url + "/v1/nothing-here"), 404)


def test_body_over_2mb_is_413(server):
    _err(httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x" * (2 * 1024 * 1024 + 10)}),
         413)


def test_adapter_errors(server, ws, tmp_path):
    _err(httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "a1", "lora_path": "a2"}), 409)
    for path in ("../a1", "/etc", os.path.dirname(ws["root"]) + "/model", "a1/../../adapters/../model"):
        b = _err(httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path}), 400)
        assert "outside the adapter root" in b["message"]
    link = os.path.join(ws["root"], "escape")
    if not os.path.islink(link):
        os.symlink(os.path.dirname(ws["a1"]) + "/../model", link)
    assert "outside" in _err(httpx.post(server.url + "/v1/load_lora_adapter",
                                        json={"lora_name": "x", "lora_path": "escape"}), 400)["message"]
    _err(httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "missing"}), 404)
    _err(httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "never"}), 404)
    _err(httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "__base__", "lora_path": "a2"}), 400)


def test_pickle_bundle_refused(server, ws):
    import shutil

    bad = os.path.join(ws["root"], "pickled")
    if not os.path.isdir(bad):
        shutil.copytree(ws["a2"], bad)
        os.rename(os.path.join(bad, "adapter_model.safetensors"), os.path.join(bad, "adapter_model.bin"))
    b = _err(httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "p", "lora_path": "pickled"}), 400)
    assert "pickle" in b["message"]


def test_saes_and_feature_descriptions(server, ws):
    saes = httpx.get(server.url + "/v1/saes").json()["data"]
    assert saes[0]["id"] == SAE and saes[0]["d_sae"] == 64
    r = httpx.get(f"{server.url}/v1/saes/{SAE}/features/3").json()
    assert r["index"] == 3 and r["described"] is False
    _err(httpx.get(f"{server.url}/v1/saes/{SAE}/features/64"), 404)  # no such feature: a missing resource
    _err(httpx.get(f"{server.url}/v1/saes/nope/features/1"), 404)


def test_metrics_exposed(server):
    _complete(server, "the cat")
    text = httpx.get(server.url + "/metrics").text
    for name in ("saelora_requests_total", "saelora_generated_tokens_total", "saelora_request_latency_seconds_bucket",
                 "saelora_batch_size", "saelora_queue_depth", "saelora_adapters_loaded"):
        assert name in text


# ---- servers with other settings -----------------------------------------------------------------------------

def test_api_key(ws):
    with LiveServer(create_app(make_engine(ws), served_name="tiny", api_key="s3cret")) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200
        _err(httpx.get(srv.url + "/v1/models"), 401, "authentication_error")
        _err(httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert c.completions.create(model="tiny", prompt="the cat", max_tokens=2).choices[0].text


def test_queue_full_is_429_with_retry_after(ws):
    with LiveServer(create_app(make_engine(ws, max_batch=1, max_queue=1), served_name="tiny")) as srv:
        async def burst():
            async with httpx.AsyncClient(timeout=60) as c:
                return await asyncio.gather(*[c.post(srv.url + "/v1/completions", json={
                    "model": "tiny", "prompt": "the cat", "max_tokens": 30}) for _ in range(6)])
        codes = [r.status_code for r in asyncio.run(burst())]
        assert 429 in codes and 200 in codes
        r = next(r for r in asyncio.run(burst()) if r.status_code == 429)
        assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"


def test_not_ready_is_503(ws):
    app = create_app(make_engine(ws), served_name="tiny")  # lifespan not run: the engine never starts

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.get("/health"), await c.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
    health, comp = asyncio.run(go())
    _err(health, 503, "service_unavailable_error")
    _err(comp, 503)


def test_failure_mid_stream_sends_error_event_then_done():
    from saelora.serve.core.engine import EngineError, Finished, TokenEvent
    from saelora.serve.api.handlers import _sse, _Stream
    from tiny import tiny_tokenizer

    async def events():
        yield 0, TokenEvent(5, 3, "cat")
        raise EngineError("internal", "generation failed: boom")

    async def collect():
        gen = events()
        first = await gen.__anext__()
        async def inline(fn, arg):
            return fn(arg)
        stream = _Stream(n=1, chat=False, model="m", tok=tiny_tokenizer(["cat"]), reply=None)
        return [ln async for ln in _sse(first, gen, stream, off_loop=inline)]
    lines = asyncio.run(collect())
    assert json.loads(lines[0][6:])["choices"][0]["text"] == "cat"
    assert json.loads(lines[1][6:])["error"]["message"] == "generation failed: boom"
    assert lines[2] == "data: [DONE]\n\n"
    assert Finished  # imported for the type of a normal ending


def test_compact_latents_equal_the_full_form_within_float16(server):
    """Both engines: the compact form (float16 values, fixed k) decodes to the full form's tokens, indices and
    values (within float16's precision); prompt latents included."""
    from saelora.clients import protocol as P

    feats = {"top_k": 6, "include_prompt": True}
    full = _complete(server, "the cat sat on", sae={"features": feats})["choices"][0]["features"]
    compact = _complete(server, "the cat sat on", sae={"features": {**feats, "format": "compact"}})
    got_p, got_g = P.ChoiceFeatures(**compact["choices"][0]["features"]).tokens()
    want = P.ChoiceFeatures(**full)
    for got, exp in ((got_p, want.prompt), (got_g, want.generated)):
        assert [(t.position, t.token_id, t.token) for t in got] == [(t.position, t.token_id, t.token) for t in exp]
        for g, w in zip(got, exp, strict=True):
            for gf, wf in zip(g.features, w.features, strict=True):
                assert gf.sae == wf.sae and gf.indices == wf.indices
                assert gf.values == pytest.approx(wf.values, rel=1e-3, abs=1e-3)
