import logging
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
logging.getLogger("saelora").setLevel(logging.INFO)


@pytest.fixture
def llama():
    from tiny import tiny_llama

    return tiny_llama()


@pytest.fixture
def gpt2():
    from tiny import tiny_gpt2

    return tiny_gpt2()


SAE = "blocks.1.hook_resid_post"


@pytest.fixture(scope="session")
def ws(tmp_path_factory):
    """A tiny model, its SAE, a corpus and two adapter bundles under an adapter root."""
    from tiny import make_bundle, tiny_workspace

    root = tmp_path_factory.mktemp("ws")
    os.environ.setdefault("SAELORA_CACHE", str(root / "cache"))
    ws = tiny_workspace(root, d_model=128, n_heads=4)  # head size 32: vLLM's CPU attention runs it too
    (root / "adapters").mkdir()
    ws["root"] = str(root / "adapters")
    ws["a1"] = str(make_bundle(ws, root / "adapters" / "a1", seed=1))
    ws["a2"] = str(make_bundle(ws, root / "adapters" / "a2", seed=2))
    return ws


def make_engine(ws, **kw):
    from saelora.adapters.models import load_model
    from saelora.adapters.saes import load_sae
    from saelora.serve.torch_engine import TorchEngine

    lm = load_model(ws["model"], device="cpu")
    return TorchEngine(lm, [load_sae(lm.model, ws["saes"][0], tokenizer=lm.tokenizer)], adapter_root=ws["root"], **kw)


@pytest.fixture(scope="session")
def torch_server(ws):
    """A real server on 127.0.0.1 with the tiny model, its SAE and adapter a1 loaded at start (torch engine)."""
    from saelora.serve.api.app import create_app
    from server_util import LiveServer

    engine = make_engine(ws)
    engine.load_adapter_now("a1", ws["a1"])
    with LiveServer(create_app(engine, served_name="tiny")) as srv:
        yield srv


@pytest.fixture(scope="session")
def vllm_server(ws, tmp_path_factory):
    """The same server with the vLLM engine (`saelora serve --engine vllm`), in a subprocess."""
    from saelora.launch import ServeProcess

    log = tmp_path_factory.mktemp("vllm") / "server.log"
    args = ["--engine", "vllm", "--model", ws["model"], "--sae", ws["saes"][0], "--adapter", f"a1={ws['a1']}",
            "--adapter-root", ws["root"], "--served-model-name", "tiny", "--kv-cache-gb", "1"]
    with ServeProcess(args, log_path=str(log), timeout=300) as srv:
        yield srv


@pytest.fixture(scope="session", params=["torch", "vllm"])
def server(request):
    """Every HTTP test runs against both engines: same API, fields and errors."""
    return request.getfixturevalue(f"{request.param}_server")


@pytest.fixture
def engine():
    """The HTTP tier's scripted engine (tests/fake_engine.py); a test module may define its own."""
    from fake_engine import FakeEngine

    return FakeEngine()


@pytest.fixture
def http(engine):
    """The real app over `engine`, in process (FastAPI's TestClient)."""
    from fastapi.testclient import TestClient

    from saelora.serve.api.app import create_app

    with TestClient(create_app(engine, served_name="fake")) as c:
        yield c


@pytest.fixture(scope="session")
def embedded_server(tmp_path_factory):
    """The demo's server on the embedded model (server_util.embedded_app), one per session: the README's examples
    and the web interface's browser tests share it (its set-up writes feature descriptions: half a minute)."""
    from server_util import LiveServer, embedded_app

    with LiveServer(embedded_app(tmp_path_factory)) as srv:
        yield srv
