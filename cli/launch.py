"""`saelora serve` in a subprocess on 127.0.0.1, used once /health answers: how the demo, the benchmarks and
the tests start servers.

    with ServeProcess(["--engine", "vllm", "--sae", sae_dir]) as srv:
        httpx.post(srv.url + "/v1/completions", json=...)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from saelora.adapters.errors import SaeloraError


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, and that this process has not handed out
    before: two servers picked before either binds (a ServeProcess, then an in-process server) never share one."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


class ServeProcess:
    """`python -m saelora serve --port PORT ARGS` with `env` added to the environment. The server's output goes to
    `log_path` (shown, its tail, when the server fails to come up) or to this process's own output."""

    def __init__(self, args: list[str], port: int | None = None, env: dict[str, str] | None = None,
                 log_path: str | None = None, timeout: float = 180) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args, self.env, self.log_path, self.timeout = args, env or {}, log_path, timeout
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> "ServeProcess":
        import httpx

        self._log = open(self.log_path, "w") if self.log_path else None  # noqa: SIM115 - closed in close()
        # SIGINT back to its default: a parent started without job control passes it on ignored.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "saelora", "serve", "--port", str(self.port), *self.args],
            stdout=self._log, stderr=subprocess.STDOUT if self._log else None,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **self.env),
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + self.timeout
        while time.time() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        code = self.proc.poll()
        self.close()
        what = f"exited with code {code}" if code is not None else f"did not become healthy within {self.timeout:.0f} s"
        raise SaeloraError(f"the server {what}" + self._log_tail())

    def _log_tail(self) -> str:
        if not self.log_path:
            return ""
        with open(self.log_path) as f:
            return "; its log:\n" + f.read()[-4000:]

    def close(self) -> None:
        """Stop the server (SIGINT, then SIGKILL after 20 s)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self) -> "ServeProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
