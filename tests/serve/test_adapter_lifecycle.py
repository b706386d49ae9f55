"""Adapter bookkeeping on both engines (live servers, tiny model): what is served is the validated private copy,
and a bundle retrained in place and reloaded under the same name serves its new weights, never stale ones
(vLLM keys its prefix cache by LoRA id)."""

import shutil
from pathlib import Path

import httpx
import pytest

from tiny import make_bundle

pytestmark = pytest.mark.integration
PROMPT = "the cat sat on the"


def _greedy(server, model):
    r = httpx.post(server.url + "/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 8,
                                                         "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _load(server, name, path):
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, timeout=120)
    assert r.status_code == 200, r.text


def _unload(server, name):
    assert httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60).status_code == 200


def test_same_name_reload_serves_the_new_weights(server, ws):
    root = Path(ws["root"])
    tag = server.url.rsplit(":", 1)[-1]  # one folder per server: both engines share the adapter root
    make_bundle(ws, root / f"re-{tag}", seed=5)
    make_bundle(ws, root / f"ref-{tag}", seed=6)
    _load(server, "re", f"re-{tag}")
    _load(server, "ref", f"ref-{tag}")
    first, reference = _greedy(server, "re"), _greedy(server, "ref")
    assert first != reference, "precondition: the two adapters must generate different text"
    _unload(server, "re")
    shutil.rmtree(root / f"re-{tag}")
    make_bundle(ws, root / f"re-{tag}", seed=6)  # retrained in place: now the reference's weights
    _load(server, "re", f"re-{tag}")
    try:
        assert _greedy(server, "re") == reference
    finally:
        _unload(server, "re")
        _unload(server, "ref")


def test_editing_the_original_after_load_changes_nothing(server, ws):
    root = Path(ws["root"])
    tag = server.url.rsplit(":", 1)[-1]
    make_bundle(ws, root / f"ed-{tag}", seed=7)
    _load(server, "ed", f"ed-{tag}")
    try:
        before = _greedy(server, "ed")
        (root / f"ed-{tag}" / "adapter_model.safetensors").write_bytes(b"garbage")  # the served copy is private
        assert _greedy(server, "ed") == before
        listed = [a for a in httpx.get(server.url + "/v1/adapters").json()["data"] if a["name"] == "ed"]
        assert listed[0]["path"] == f"ed-{tag}"  # the folder's name, not a server path
    finally:
        _unload(server, "ed")


def test_vllm_evicts_and_reloads_more_adapters_than_slots(ws, tmp_path):
    """More adapters than vLLM's --max-loras: each still serves its own weights, the same text before and after
    being evicted and re-read (from the private copy)."""
    from saelora.launch import ServeProcess

    root = Path(ws["root"])
    for i in range(3):
        make_bundle(ws, root / f"ev{i}", seed=20 + i)
    args = ["--engine", "vllm", "--model", ws["model"], "--sae", ws["saes"][0], "--served-model-name", "tiny",
            "--kv-cache-gb", "1", "--max-loras", "1", "--adapter-root", ws["root"]]
    with ServeProcess(args, log_path=str(tmp_path / "server.log"), timeout=300) as srv:
        for i in range(3):
            _load(srv, f"ev{i}", f"ev{i}")
        first = [_greedy(srv, f"ev{i}") for i in range(3)]
        again = [_greedy(srv, f"ev{i}") for i in reversed(range(3))][::-1]
        assert first == again and len(set(first)) == 3, first


def _copies_of(ws, folder: Path) -> list[Path]:
    """The private copies of the bundle at `folder`, in any server process's copies folder (content-addressed)."""
    import hashlib

    from saelora.adapters.bundle import BUNDLE_FILES
    from saelora.adapters.config import cache_dir

    digest = hashlib.sha256()
    for name in BUNDLE_FILES:
        digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return list((cache_dir() / "served-adapters").glob(f"*/{digest.hexdigest()[:32]}"))


def test_unloading_deletes_the_private_copy(server, ws):
    """Invariant: copies do not pile up on disk: an unloaded adapter's private copy is gone."""
    root = Path(ws["root"])
    tag = server.url.rsplit(":", 1)[-1]
    make_bundle(ws, root / f"gc-{tag}", seed=int(tag) % 1000 + 30)  # bytes of its own: a copy of its own
    _load(server, "gc", f"gc-{tag}")
    try:
        assert len(_copies_of(ws, root / f"gc-{tag}")) == 1
        _greedy(server, "gc")  # served (from the copy); its text may be empty: a random adapter may end at once
    finally:
        _unload(server, "gc")
    assert _copies_of(ws, root / f"gc-{tag}") == []
