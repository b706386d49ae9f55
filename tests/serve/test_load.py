"""Bounded load on both engines (tiny model): 64 concurrent streams against 8 slots and 8 waiting places.
Invariants: every accepted stream ends with [DONE], every refused request is a 429 with Retry-After, no 5xx,
and the running/waiting gauges return to 0. The burst: tests/load_util.py (bench/serve_load.py uses it too)."""

import asyncio
import time

import httpx
import pytest

from conftest import make_engine
from saelora.serve.api.app import create_app
from server_util import LiveServer

from load_util import burst, invariants_hold

pytestmark = pytest.mark.integration


def _gauges_back_to_zero(url: str) -> bool:
    deadline = time.time() + 30
    while time.time() < deadline:
        text = httpx.get(url + "/metrics").text
        values = [ln.split()[-1] for ln in text.splitlines()
                  if ln.startswith(("saelora_batch_size ", "saelora_queue_depth "))]
        if values and all(float(v) == 0 for v in values):
            return True
        time.sleep(0.2)
    return False


def _check(url: str) -> None:
    res = asyncio.run(burst(url, streams=64, max_tokens=16))
    assert invariants_hold(res), res
    assert 0 < res["accepted"] <= 16 and res["refused_429"] >= 48, res
    assert _gauges_back_to_zero(url)


def test_bounded_load_torch(ws):
    with LiveServer(create_app(make_engine(ws, max_batch=8, max_queue=8), served_name="tiny")) as srv:
        _check(srv.url)


def test_bounded_load_vllm(ws, tmp_path):
    from saelora.launch import ServeProcess

    args = ["--engine", "vllm", "--model", ws["model"], "--sae", ws["saes"][0], "--served-model-name", "tiny",
            "--kv-cache-gb", "1", "--max-batch", "8", "--max-queue", "8"]
    with ServeProcess(args, log_path=str(tmp_path / "server.log"), timeout=300) as srv:
        _check(srv.url)
