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


def embedded_app(tmp_path_factory):  # noqa: ANN001, ANN201
    """The demo's server on the embedded model (torch engine): SmolLM2 with a copy of its shipped SAE and that
    SAE's feature descriptions (written by `saelora features` as `make demo` runs it, on fewer rows), and an
    adapter bundle `mine` under the adapter root. The README's examples and the web interface's tests run on it."""
    import shutil

    from saelora.adapters.models import load_model
    from saelora.adapters.saes import load_sae, shipped_sae
    from saelora.serve.api.app import create_app
    from saelora.serve.torch_engine import TorchEngine
    from saelora.trainer.features import FeaturesConfig, run_features
    from tiny import make_bundle

    sae_dir = str(shutil.copytree(shipped_sae("smollm2-135m"), tmp_path_factory.mktemp("sae") / "sae"))
    run_features(FeaturesConfig(model="smollm2-135m", saes=[sae_dir], corpus=["wiki"], rows=32, top_n=4))
    root = tmp_path_factory.mktemp("adapters")
    make_bundle({"model": "smollm2-135m", "saes": [sae_dir]}, root / "mine", scale=0.01)
    lm = load_model("smollm2-135m", device="cpu")
    engine = TorchEngine(lm, [load_sae(lm.model, sae_dir, tokenizer=lm.tokenizer)], adapter_root=str(root))
    return create_app(engine, served_name="smollm2-135m")
