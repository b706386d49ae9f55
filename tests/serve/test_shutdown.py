"""SIGTERM on `saelora serve` (both engines, tiny model): the request in flight finishes with [DONE], new
requests are refused (503, or the connection is refused once the socket is closed), the process exits within
the grace period (uvicorn re-raises the signal after its graceful shutdown, so the status says SIGTERM), and
leaves no child process behind."""

import os
import signal
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.integration


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except OSError:
                continue
    return out


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        out += kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _in_flight(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(ln.split()[-1]) for ln in text.splitlines()
               if ln.startswith(("saelora_batch_size ", "saelora_queue_depth ")))


# What a server needs for the drain check below: one row at a time, so that requests wait their turn.
DRAIN_ARGS = ["--max-batch", "1", "--shutdown-grace", "30"]


@pytest.mark.parametrize("engine", ["torch", "vllm"])
def test_sigterm_drains_and_exits_cleanly(ws, tmp_path, engine):
    """The vLLM engine in multiprocess mode gets the same check at the end of
    test_vllm.py::test_multiprocess_mode_matches_torch_engine_and_drains_on_sigterm, on its server (one start less)."""
    from saelora.launch import ServeProcess

    args = ["--engine", engine, "--model", ws["model"], "--sae", ws["saes"][0], "--served-model-name", "tiny",
            "--kv-cache-gb", "1", *DRAIN_ARGS]
    srv = ServeProcess(args, log_path=str(tmp_path / "server.log"), timeout=300).start()
    try:
        assert_sigterm_drains_and_exits_cleanly(srv)
    finally:
        srv.close()


def assert_sigterm_drains_and_exits_cleanly(srv, multiprocess: bool = False) -> None:
    """Four streams in flight on `srv` (started with DRAIN_ARGS), then SIGTERM: see the module's invariants.
    `multiprocess`: vLLM runs its engine core in a child process (VLLM_ENABLE_V1_MULTIPROCESSING=1), which
    must show up and be gone too."""
    first, streams = threading.Event(), [{"lines": [], "last": 0.0} for _ in range(4)]

    def stream(out):  # greedy, 80 tokens (past EOS); with --max-batch 1 the others wait their turn
        body = {"prompt": "a big red fox jumps over the lazy", "max_tokens": 80, "temperature": 0,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=120) as r:
            for ln in r.iter_lines():
                if ln.startswith("data: "):
                    out["lines"].append(ln)
                    out["last"] = time.time()
                    first.set()

    threads = [threading.Thread(target=stream, args=(out,)) for out in streams]
    for t in threads:
        t.start()
    assert first.wait(60)
    deadline = time.time() + 30  # every request accepted (running or waiting) before the signal
    while _in_flight(srv.url) < len(streams) and time.time() < deadline:
        time.sleep(0.01)
    spawned = _descendants(srv.proc.pid)  # checked by pid afterwards: an orphan is re-parented, not gone
    srv.proc.send_signal(signal.SIGTERM)
    sigterm = time.time()
    time.sleep(0.2)
    try:
        late = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=10)
        assert late.status_code == 503, late.text
    except httpx.ConnectError:
        pass  # the listening socket is already closed: also a refusal
    for t in threads:
        t.join(90)
    ends = [out["lines"][-1] if out["lines"] else None for out in streams]
    assert ends == ["data: [DONE]"] * len(streams), ends
    assert not any('"error"' in ln for out in streams for ln in out["lines"])
    assert max(out["last"] for out in streams) > sigterm + 0.2  # work in flight went on after SIGTERM
    # uvicorn re-raises the signal once it has shut down gracefully: the exit status is "killed by SIGTERM"
    assert srv.proc.wait(40) in (0, -signal.SIGTERM)
    deadline = time.time() + 10
    while any(map(_alive, spawned)) and time.time() < deadline:
        time.sleep(0.1)
    assert [p for p in spawned if _alive(p)] == []
    if multiprocess:
        assert spawned, "the multiprocess engine core never showed up as a child process"
