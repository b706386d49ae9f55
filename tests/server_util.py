"""A real saelora server on 127.0.0.1 in a background thread, for integration tests."""

from __future__ import annotations

import threading
import time

import uvicorn

from saelora.launch import free_port


class LiveServer:
    def __init__(self, app) -> None:  # noqa: ANN001
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)



def error_body(r, status: int, kind: str | None = None) -> dict:
    """The OpenAI error envelope of response `r`, after checking its status (and error type, when given)."""
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    if kind:
        assert body["type"] == kind
    return body
