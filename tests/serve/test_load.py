"""Bounded load on both engines (tiny model): 64 concurrent clients (streams, /v1/features on long texts, long
prompts) against 8 slots and 8 waiting places.
Invariants: every accepted stream ends with [DONE], every refused request is a 429 with Retry-After, no 5xx,
and the running/waiting gauges return to 0. The burst: tests/load_util.py (bench/serve_load.py uses it too)."""

import asyncio
import os
import threading
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


MEMORY_BOUND_MB = 1024  # the server's resident memory may grow this much over a burst, and no more


class PeakRSS:
    """The peak resident memory of process `pid` while the block runs, sampled every 50 ms (MB above the start)."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.proc, self.peak, self.stop = psutil.Process(pid), 0.0, threading.Event()

    def _sample(self) -> None:
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, self.proc.memory_info().rss / 2**20 - self.start)

    def __enter__(self) -> "PeakRSS":
        self.start = self.proc.memory_info().rss / 2**20
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _check(url: str, pid: int) -> None:
    """64 clients, a third streaming, a third asking /v1/features of a long text, a third completing a long
    prompt, against 8 slots and 8 waiting places: the invariants hold and memory stays within the bound."""
    with PeakRSS(pid) as mem:
        res = asyncio.run(burst(url, streams=64, max_tokens=16, mix=True))
    assert invariants_hold(res), res
    assert res["accepted"] >= 16 and res["refused_429"] > 0, res  # quick ones free their place for later ones
    assert mem.peak < MEMORY_BOUND_MB, mem.peak
    assert _gauges_back_to_zero(url)


def test_bounded_load_torch(ws):
    with LiveServer(create_app(make_engine(ws, max_batch=8, max_queue=8), served_name="tiny")) as srv:
        _check(srv.url, os.getpid())


def test_bounded_load_vllm(ws, tmp_path):
    from saelora.launch import ServeProcess

    args = ["--engine", "vllm", "--model", ws["model"], "--sae", ws["saes"][0], "--served-model-name", "tiny",
            "--kv-cache-gb", "1", "--max-batch", "8", "--max-queue", "8"]
    with ServeProcess(args, log_path=str(tmp_path / "server.log"), timeout=300) as srv:
        _check(srv.url, srv.proc.pid)
