"""Fast HTTP tier: the real FastAPI app (protocol, handlers, routes, error envelope, auth, body limit,
streaming) in process over a scripted engine (tests/fake_engine.py); no model runs."""

import json

import pytest
from fastapi.testclient import TestClient

from fake_engine import FakeEngine
from saelora.serve.api.app import create_app


def _envelope(r, status, code=None):
    """Invariant: every error is the OpenAI envelope {"error": {message, type, param, code}} with a 4xx/5xx."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    return err


def test_completion_reaches_the_engine_as_typed_request(http, engine):
    body = {"model": "fake", "prompt": "the cat", "max_tokens": 3, "temperature": 0, "seed": 7,
            "sae": {"edits": [{"feature": 2, "op": "set", "value": 1.5, "positions": "generated"}],
                    "features": {"top_k": 1}}}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    assert len(out["choices"][0]["features"]["generated"]) == 3
    req = engine.requests[-1]
    assert req.sampling.seed == 7 and req.sampling.temperature == 0 and req.adapter is None
    (edit,) = req.splice.edits
    assert (edit.sae, edit.feature, edit.op, edit.value, edit.positions) == ("fake", 2, "set", 1.5, "generated")


def test_stream_concatenates_to_the_non_streamed_text(http):
    body = {"model": "fake", "prompt": "the cat", "max_tokens": 4}
    full = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    parts = [json.loads(ln[6:])["choices"][0]["text"] for ln in lines[:-1] if json.loads(ln[6:])["choices"]]
    assert "".join(parts) == full


def test_n_choices_get_distinct_seeds(http, engine):
    http.post("/v1/completions", json={"model": "fake", "prompt": "the", "max_tokens": 1, "n": 3, "seed": 10})
    assert [r.sampling.seed for r in engine.requests[-3:]] == [10, 11, 12]


@pytest.mark.parametrize("body,status,param", [
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"model": "fake", "prompt": "x", "max_tokens": -1}, 400, None),
    ({"model": "fake", "prompt": "x", "sae": {"edits": [{"feature": 1, "op": "explode", "value": 1}]}}, 400, None),
    ({"model": "fake", "prompt": "x", "sae": {"edits": [{"feature": 1, "op": "set", "value": 1e39}]}}, 400, None),
    ({"model": "fake", "prompt": "x", "unknown_field": 1}, 200, None),  # OpenAI clients send extras
    ({"model": "fake", "prompt": "x", "sae": {"bogus": 1}}, 400, None),  # the sae extension is strict
])
def test_bad_requests_get_the_envelope(http, body, status, param):
    r = http.post("/v1/completions", json={"max_tokens": 1, **body})
    if status == 200:
        assert r.status_code == 200, r.text
        return
    err = _envelope(r, status)
    if param:
        assert err["param"] == param


def test_invalid_json_is_a_400(http):
    r = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    _envelope(r, 400)


def test_engine_errors_map_to_status_codes(engine):
    engine.full = True
    with TestClient(create_app(engine, served_name="fake")) as c:
        _envelope(c.post("/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 1}), 429)
    engine.full = False
    with TestClient(create_app(engine, served_name="fake")) as c:
        _envelope(c.post("/v1/unload_lora_adapter", json={"lora_name": "absent"}), 404)
        assert c.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "p"}).status_code == 200
        _envelope(c.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "p"}), 409)
        assert [a["name"] for a in c.get("/v1/adapters").json()["data"]] == ["a"]
        r = c.post("/v1/completions", json={"model": "a", "prompt": "the", "max_tokens": 1})
        assert r.status_code == 200 and engine.requests[-1].adapter == "a"


def test_api_key_and_body_limit(engine):
    with TestClient(create_app(engine, served_name="fake", api_key="k", max_body=256)) as c:
        assert c.get("/health").status_code == 200  # open
        _envelope(c.get("/v1/models"), 401)
        ok = {"Authorization": "Bearer k"}
        assert c.get("/v1/models", headers=ok).json()["data"][0]["id"] == "fake"
        _envelope(c.post("/v1/completions", json={"model": "fake", "prompt": "x" * 1000}, headers=ok), 413)


def test_features_and_descriptions(http):
    r = http.post("/v1/features", json={"model": "fake", "input": "the cat", "top_k": 1})
    assert r.status_code == 200 and [t["position"] for t in r.json()["tokens"]] == [0, 1]
    sae = http.get("/v1/saes").json()["data"][0]
    assert sae["id"] == "fake" and sae["has_descriptions"] is False
    assert http.get("/v1/saes/fake/features/3").json()["described"] is False
    _envelope(http.get("/v1/saes/fake/features/16"), 404)
    _envelope(http.get("/v1/saes/fake/features/-1"), 400)
    _envelope(http.get("/v1/saes/nope/features/0"), 404)


def test_openapi_lists_every_route(http):
    paths = set(http.get("/openapi.json").json()["paths"])
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/features", "/v1/saes",
            "/v1/saes/{sae_id}/features/{index}", "/v1/adapters", "/v1/load_lora_adapter",
            "/v1/unload_lora_adapter"} <= paths


def test_openapi_bounds_token_ids_by_this_servers_vocabulary(http, engine):
    doc = http.get("/openapi.json").json()
    (ids,) = [a for a in doc["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]["anyOf"]
              if a.get("type") == "array" and a["items"].get("type") == "integer"]
    assert ids["items"]["maximum"] == len(engine.tokenizer) - 1
    (batch,) = [a for a in doc["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]["anyOf"]
                if a.get("type") == "array" and a["items"].get("type") == "array"]  # [[ids]]: lm-eval's batch
    assert batch["items"]["items"]["maximum"] == len(engine.tokenizer) - 1
    _envelope(http.post("/v1/completions", json={"prompt": [len(engine.tokenizer)]}), 400)
    _envelope(http.post("/v1/completions", json={"prompt": [[len(engine.tokenizer)]]}), 400)


def test_context_overflow_carries_openai_code(http):
    r = http.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 10_000})
    _envelope(r, 400)
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_every_error_kind_has_one_status():
    """Invariant: the HTTP error table covers exactly the engine's error vocabulary; unknown kinds are refused."""
    from saelora.serve.api.errors import KINDS
    from saelora.serve.core.engine import ERROR_KINDS, EngineError
    assert set(KINDS) == set(ERROR_KINDS)
    with pytest.raises(ValueError):
        EngineError("oops", "x")


def test_not_ready_is_a_503_with_retry_after(engine):
    app = create_app(engine, served_name="fake")
    with TestClient(app) as c:
        engine._ready = False
        r = c.post("/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 1})
        _envelope(r, 503)
        assert r.headers["retry-after"] == "1"
        _envelope(c.get("/health"), 503)


def test_n_choices_over_capacity_is_a_429_not_a_500():
    """Regression: with room for one generation, n=3 used to close generators that cancelled tasks were still
    running (500). Drives the real Handlers._merged."""
    engine = FakeEngine(capacity=1)
    with TestClient(create_app(engine, served_name="fake")) as c:
        r = c.post("/v1/completions", json={"prompt": "the", "max_tokens": 5, "n": 3})
        _envelope(r, 429)
        assert engine.running == 0  # every started generation was closed
        assert c.post("/v1/completions", json={"prompt": "the", "max_tokens": 2}).status_code == 200


def test_error_mid_stream_ends_the_stream_with_an_error_event():
    engine = FakeEngine(fail_at=2)
    with TestClient(create_app(engine, served_name="fake")) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": "the", "max_tokens": 5, "stream": True}) as r:
            events = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
        assert r.status_code == 200 and events[-1]["error"]["code"] == "internal_error"
        assert "request id" in events[-1]["error"]["message"]
        assert "a step failed" not in json.dumps(events)  # logged, never sent
        assert engine.running == 0


def test_an_unexpected_error_is_a_500_with_a_request_id_and_never_its_text(caplog):
    """Invariant: only typed request errors are 4xx; a bug (here a ValueError carrying a server path) is a 500
    whose message and header carry a request id that the log also has, and never the error's text."""
    class Buggy(FakeEngine):
        async def encode(self, *args, **kwargs):
            raise ValueError("/srv/secret/path is broken")

    with TestClient(create_app(Buggy(), served_name="fake"), raise_server_exceptions=False) as c:
        r = c.post("/v1/features", json={"model": "fake", "input": "the cat", "top_k": 1})
    err = _envelope(r, 500, "internal_error")
    assert "secret" not in r.text and r.headers["X-Request-Id"] in err["message"]
    assert r.headers["X-Request-Id"] in caplog.text and "secret" in caplog.text


def test_chunked_body_over_the_limit_is_a_413(engine):
    """A body without Content-Length is counted as it streams; past the limit the answer is 413."""
    def chunks():
        for _ in range(100):  # 100 x 1 KiB against a 4 KiB limit
            yield b" " * 1024

    with TestClient(create_app(engine, served_name="fake", max_body=4096)) as c:
        _envelope(c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}), 413)
        small = c.post("/v1/completions", content=iter([b'{"prompt": "the", ', b'"max_tokens": 1}']),
                       headers={"content-type": "application/json"})
        assert small.status_code == 200, small.text


def test_body_limit_stops_reading_past_the_limit():
    """Invariant: BodyLimit pulls no more than the limit (plus one chunk) from the connection."""
    import asyncio

    from saelora.serve.api.app import BodyLimit
    pulled = []

    async def receive():
        pulled.append(1)
        return {"type": "http.request", "body": b"x" * 1024, "more_body": True}

    async def app(scope, receive, send):
        while True:
            await receive()

    with pytest.raises(Exception) as info:
        asyncio.run(BodyLimit(app, max_body=4096)({"type": "http"}, receive, None))
    assert getattr(info.value, "status_code", None) == 413 and len(pulled) == 5


def test_admin_key_guards_adapter_management(engine):
    """Invariant: the inference key alone cannot load or unload adapters."""
    load = {"lora_name": "a", "lora_path": "p"}
    user, admin = {"Authorization": "Bearer k"}, {"Authorization": "Bearer adm"}
    with TestClient(create_app(engine, served_name="fake", api_key="k")) as c:
        _envelope(c.post("/v1/load_lora_adapter", json=load, headers=user), 403)
    with TestClient(create_app(engine, served_name="fake", api_key="k", admin_api_key="adm")) as c:
        _envelope(c.post("/v1/load_lora_adapter", json=load, headers=user), 401)
        assert c.post("/v1/load_lora_adapter", json=load, headers=admin).status_code == 200
        assert c.get("/v1/adapters", headers=user).json()["data"][0]["name"] == "a"
        assert c.get("/v1/adapters", headers=admin).status_code == 200  # the admin key works on every route
        for header in ("bearer adm", "BEARER k", "  Bearer   k "):  # the scheme is case-insensitive (RFC 7235)
            assert c.get("/v1/models", headers={"Authorization": header}).status_code == 200, header
        for header in ("Basic k", "k", "Bearer", "Bearer k2", "Bearerk"):
            _envelope(c.get("/v1/models", headers={"Authorization": header}), 401, "invalid_api_key")
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "a"}, headers=admin).status_code == 200


def test_adapter_names_and_paths_are_bounded(http):
    for name in ("a.b", "", "x" * 65, "../x"):
        _envelope(http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "p"}), 400)
    _envelope(http.post("/v1/load_lora_adapter", json={"lora_name": "ok", "lora_path": "p" * 1025}), 400)


@pytest.mark.integration
@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_cancels_the_generation(stream):
    """A client that goes away (here: times out) stops its generation, streaming or not; nothing keeps
    generating for nobody. Live server, fake engine at 50 ms per token."""
    import time

    import httpx

    from server_util import LiveServer
    engine = FakeEngine(max_len=1000, token_s=0.05)
    with LiveServer(create_app(engine, served_name="fake")) as srv:
        body = {"prompt": "the", "max_tokens": 200, "stream": stream}  # 10 s of generation
        if stream:  # read a few events, then hang up
            with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=5) as r:
                for i, _ in enumerate(r.iter_lines()):
                    if i == 3:
                        break
        else:
            with pytest.raises(httpx.TimeoutException):
                httpx.post(srv.url + "/v1/completions", json=body, timeout=0.5)
        deadline = time.time() + 3
        while engine.running and time.time() < deadline:
            time.sleep(0.05)
        assert engine.running == 0 and engine.closed_early == 1


def test_loopback_server_refuses_foreign_host_headers(engine):
    """DNS rebinding guard: with allowed_hosts (set by `saelora serve` on loopback), another Host is refused."""
    with TestClient(create_app(engine, served_name="fake", allowed_hosts=["127.0.0.1", "localhost"]),
                    base_url="http://127.0.0.1") as c:
        assert c.get("/v1/models").status_code == 200
        assert c.get("/v1/models", headers={"host": "evil.example"}).status_code == 400
        _envelope(c.get("/v1/models", headers={"host": "evil.example:8000"}), 400)
        assert c.get("/v1/models", headers={"host": "localhost:8000"}).status_code == 200


def test_latent_json_is_built_off_the_event_loop(http, monkeypatch):
    """Invariant: per-token latents (a response can hold megabytes of them) are turned into JSON on the worker
    thread, not the event loop: non-streaming completions and chats, /v1/features, and a stream's prompt latents."""
    import threading

    from saelora.serve.api import handlers, wire

    threads, real = [], wire.token_features

    def spy(t, tok):
        threads.append((t.position, threading.current_thread().name))
        return real(t, tok)
    for module in (handlers, wire):  # /v1/features builds them in handlers, completions through wire.choice_features
        monkeypatch.setattr(module, "token_features", spy)
    feats = {"sae": {"features": {"top_k": 2, "include_prompt": True}}}
    assert http.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 2, **feats}).status_code == 200
    assert http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "the cat"}],
                                                   "max_tokens": 2, **feats}).status_code == 200
    assert http.post("/v1/features", json={"input": "the cat sat"}).status_code == 200
    assert threads and all(name.startswith("saelora-tok") for _, name in threads), threads
    threads.clear()
    with http.stream("POST", "/v1/completions", json={"prompt": "the cat sat", "max_tokens": 1, "stream": True,
                                                      **feats}) as r:
        assert r.status_code == 200 and [ln for ln in r.iter_lines() if ln][-1] == "data: [DONE]"
    prompt = [name for pos, name in threads if pos < 3]  # one generated token's latents stay on the loop: small
    assert len(prompt) == 3 and all(name.startswith("saelora-tok") for name in prompt), threads


def test_echo_returns_the_prompt_and_its_scores_before_the_completion(http, engine):
    r = http.post("/v1/completions", json={"prompt": "the cat", "echo": True, "max_tokens": 2}).json()["choices"][0]
    assert r["text"].startswith("the cat") and r["text"] != "the cat" and r.get("logprobs") is None
    assert engine.requests[-1].sampling.prompt_logprobs == 0  # echo alone: the prompt is passed through the engine
    r = http.post("/v1/completions", json={"prompt": "the cat", "echo": True, "logprobs": 1, "max_tokens": 0})
    c = r.json()["choices"][0]
    assert c["text"] == "the cat" and c["logprobs"]["token_logprobs"] == [None, -1.0]
    assert c["logprobs"]["top_logprobs"][0] is None and r.json()["usage"]["completion_tokens"] == 0
    c = http.post("/v1/completions", json={"prompt": [[5, 6, 7]], "prompt_logprobs": 0, "max_tokens": 1}).json()
    dec = engine.tokenizer.decode
    assert c["choices"][0]["prompt_logprobs"] == [None, {"6": {"logprob": -1.0, "rank": 1, "decoded_token": dec([6])}},
                                                  {"7": {"logprob": -1.0, "rank": 1, "decoded_token": dec([7])}}]
    empty = http.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 0}).json()
    assert empty["choices"][0]["text"] == "" and empty["usage"]["completion_tokens"] == 0
    schema = http.get("/openapi.json").json()["components"]["schemas"]["CompletionRequest"]["properties"]
    assert "prompt_logprobs" in schema and "echo" in schema


def test_compact_latents_decode_to_the_full_forms_objects(http):
    from saelora.clients import protocol as P

    body = {"prompt": "the cat", "max_tokens": 3, "sae": {"features": {"top_k": 2, "include_prompt": True}}}
    full = P.ChoiceFeatures(**http.post("/v1/completions", json=body).json()["choices"][0]["features"])
    body["sae"]["features"]["format"] = "compact"
    raw = http.post("/v1/completions", json=body).json()["choices"][0]["features"]
    assert raw["generated"] == [] and raw["compact"]["prompt_count"] == 2
    assert P.ChoiceFeatures(**raw).tokens() == full.tokens()
    chunks = []  # streamed: each chunk's compact arrays decode to that chunk's tokens
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                f = json.loads(line[6:])["choices"][0].get("features")
                if f:
                    chunks.append(P.ChoiceFeatures(**f).tokens())
    assert [t for p, _ in chunks for t in (p or [])] == full.prompt
    assert [t for _, g in chunks for t in g] == full.generated


def test_the_web_page_is_open_its_data_is_not_and_the_host_rule_holds(engine):
    """/ui's files hold no data and load without the key (the page asks for it); every API call it makes needs
    the key; a Host outside the allowed names gets 400 on /ui as on the API; only shipped assets are served."""
    app = create_app(engine, served_name="fake", api_key="k", allowed_hosts=["testserver"])
    with TestClient(app) as c:
        page = c.get("/ui/features/s0/3")
        assert page.status_code == 200 and '<base href="/ui/">' in page.text and "assets/app.js" in page.text
        assert c.get("/ui/assets/views.js").headers["content-type"].startswith("text/javascript")
        _envelope(c.get("/ui/assets/secrets.txt"), 404)
        _envelope(c.get("/v1/saes"), 401)
        _envelope(c.get("/ui/", headers={"host": "attacker.example"}), 400)
        _envelope(c.get("/uix"), 401)  # a prefix match is a path segment, not a string prefix
