"""Isolation on the torch engine: a row that fails ends alone, and adapter counts cannot leak (live server,
tiny model). The failure is injected into sampling for one request (by its seed), the way a non-finite logit or
a sampling error would surface."""

import threading
import time

import httpx
import pytest

from conftest import make_engine
from saelora.serve.api.app import create_app
from saelora.serve.torch_engine import engine as torch_engine
from server_util import LiveServer

pytestmark = pytest.mark.integration
POISON_SEED = 13


@pytest.fixture
def poisoned(monkeypatch):
    real, calls = torch_engine.sample, {}

    def sample(logits, s, gen):
        calls[id(s)] = calls.get(id(s), 0) + 1
        if s.seed == POISON_SEED and calls[id(s)] == 3:  # in a batched decode step, not the prefill
            raise RuntimeError("injected sampling failure")
        return real(logits, s, gen)

    monkeypatch.setattr(torch_engine, "sample", sample)


def test_a_failing_row_ends_alone_and_the_victim_stream_completes(ws, poisoned):
    engine = make_engine(ws, max_batch=4)
    engine.load_adapter_now("a1", ws["a1"])
    with LiveServer(create_app(engine, served_name="tiny")) as srv:
        victim: dict = {}

        def stream():
            body = {"model": "a1", "prompt": "the cat sat on", "max_tokens": 120, "temperature": 0, "stream": True,
                    "ignore_eos": True}  # long enough to share decode steps with the attacker
            with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
                victim["lines"] = [ln for ln in r.iter_lines() if ln.startswith("data: ")]

        t = threading.Thread(target=stream)
        t.start()
        attacker = httpx.post(srv.url + "/v1/completions", json={"model": "a1", "prompt": "the dog", "max_tokens": 8,
                                                                  "seed": POISON_SEED}, timeout=60)
        t.join(60)
        msg = attacker.json()["error"]["message"]
        assert attacker.status_code == 500 and "request id" in msg and "injected" not in msg  # logged, never sent
        assert victim["lines"][-1] == "data: [DONE]"
        assert not any('"error"' in ln for ln in victim["lines"])
        # bookkeeping: both rows released adapter a1 exactly once
        (a1,) = [a for a in httpx.get(srv.url + "/v1/adapters").json()["data"] if a["name"] == "a1"]
        assert a1["in_flight"] == 0


def test_health_turns_503_while_every_step_fails(ws, monkeypatch):
    """An engine whose steps keep failing is not healthy: /health answers 503 after 3 failed steps in a row."""
    engine = make_engine(ws, max_batch=2)
    with LiveServer(create_app(engine, served_name="tiny")) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200

        def broken_step():
            raise RuntimeError("injected step failure")

        monkeypatch.setattr(engine, "_decode_step", broken_step)
        for _ in range(3):
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": "the cat", "max_tokens": 4}, timeout=60)
            assert r.status_code == 500
        assert httpx.get(srv.url + "/health").status_code == 503


def test_an_engine_thread_that_dies_answers_every_waiting_and_new_request_503(ws, monkeypatch):
    """Invariant: no request waits forever. The thread dies outside a step (here: admitting a row); the request
    it was admitting gets 503, so does every later one, and /health says so. Every 503 says why (restart the
    server), also when the thread died before the request came in (a race this test once lost)."""
    engine = make_engine(ws, max_batch=2)
    with LiveServer(create_app(engine, served_name="tiny")) as srv:
        def broken_admit():
            raise RuntimeError("injected admission failure")

        monkeypatch.setattr(engine, "_admit", broken_admit)
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "the cat", "max_tokens": 4}, timeout=60)
        assert r.status_code == 503 and "restart" in r.json()["error"]["message"], r.text
        assert "injected" not in r.text
        again = httpx.post(srv.url + "/v1/features", json={"input": "the cat", "top_k": 2}, timeout=60)
        assert again.status_code == 503 and again.headers["Retry-After"]
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 503 and "restart" in health.json()["error"]["message"]


def test_the_features_route_counts_against_admission(ws):
    """Invariant: every route that runs the model is admitted like a completion: with one slot and no queue,
    a features request beside a running stream gets 429, and once the stream ends it is served."""
    engine = make_engine(ws, max_batch=1, max_queue=0)
    with LiveServer(create_app(engine, served_name="tiny")) as srv:
        started, lines = threading.Event(), []

        def stream():
            body = {"prompt": "the cat sat on", "max_tokens": 200, "temperature": 0, "stream": True,
                    "ignore_eos": True}
            with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
                for ln in r.iter_lines():
                    started.set()
                    lines.append(ln)

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(60)
        busy = httpx.post(srv.url + "/v1/features", json={"input": "the cat", "top_k": 2}, timeout=60)
        t.join(60)
        assert busy.status_code == 429 and busy.json()["error"]["code"] == "rate_limit_exceeded", busy.text
        assert [ln for ln in lines if ln.startswith("data: ")][-1] == "data: [DONE]"
        assert httpx.post(srv.url + "/v1/features", json={"input": "the cat", "top_k": 2},
                          timeout=60).status_code == 200


def test_the_torch_engine_prefills_within_the_token_budget(ws, monkeypatch):
    """--max-num-batched-tokens: new rows wait for a later step rather than be prefilled past the budget (left
    padding counts); a prompt longer than the budget is prefilled alone; every request still completes."""
    engine = make_engine(ws, max_batch=8, max_num_batched_tokens=24)
    steps = []
    real = engine._prefill

    def spy(rows):
        steps.append((len(rows), max(len(r.ids) for r in rows)))
        return real(rows)

    prompts = ["the cat sat on the mat", "a dog ran", "sun rises east and sets west", "river flows",
               " ".join(["word"] * 40)]  # the last one is over the budget on its own
    admit, gate = engine._admit, threading.Event()

    def admit_when_all_queued():  # every request waits in the queue before the first admission: one choice
        if not gate.is_set() and engine.incoming.qsize() < len(prompts):
            return
        gate.set()
        admit()

    monkeypatch.setattr(engine, "_prefill", spy)
    monkeypatch.setattr(engine, "_admit", admit_when_all_queued)
    with LiveServer(create_app(engine, served_name="tiny")) as srv:
        def complete(p):
            return httpx.post(srv.url + "/v1/completions", json={"prompt": p, "max_tokens": 3, "temperature": 0},
                              timeout=60)

        threads = [threading.Thread(target=lambda p=p: results.append(complete(p))) for p in prompts]
        results: list = []
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert [r.status_code for r in results] == [200] * len(prompts)
    assert all(n * longest <= 24 or n == 1 for n, longest in steps), steps
    assert any(n == 1 and longest > 24 for n, longest in steps), steps  # the long prompt, alone
    assert any(n > 1 for n, _ in steps), steps  # short ones do share a step


def test_a_request_past_the_timeout_gets_504_and_its_row_is_dropped(ws, monkeypatch):
    """--request-timeout: a generation still running at the deadline ends with 504 (streamed: an error event with
    that code, then [DONE]); its row leaves the batch, so the server serves the next request at once."""
    engine = make_engine(ws, max_batch=2, request_timeout=1.0)
    step = engine._decode_step

    def slow_step(*args, **kwargs):  # 50 ms a token: 200 tokens take 10 s, two take 0.1 s
        time.sleep(0.05)
        return step(*args, **kwargs)

    monkeypatch.setattr(engine, "_decode_step", slow_step)
    body = {"prompt": "the cat", "max_tokens": 200, "ignore_eos": True, "temperature": 0}
    with LiveServer(create_app(engine, served_name="tiny")) as srv:
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout", r.text
        with httpx.stream("POST", srv.url + "/v1/completions", json=dict(body, stream=True), timeout=60) as s:
            lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
        assert '"request_timeout"' in lines[-2] and lines[-1] == "data: [DONE]"
        ok = httpx.post(srv.url + "/v1/completions", json={"prompt": "the cat", "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200 and engine.in_flight == 0
