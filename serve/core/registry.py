"""Adapters the server knows: validated bundles keyed by name, with in-flight request counts.

Runtime loads are confined to `--adapter-root`: the path is resolved (symlinks followed) and must stay
inside the root's real path; safetensors only (the bundle validator refuses pickle). A bundle is fully
validated against the base model's and SAEs' fingerprints, then copied to a private content-addressed folder
($SAELORA_CACHE/served-adapters/<pid>/<sha256>) and validated again there; both engines load only that copy,
which unloading deletes. Unloading an adapter that requests are using fails with 409 (conflict) instead of
waiting; loading more than --max-adapters fails with 409 too.
"""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from saelora.adapters.bundle import Bundle, BundleError, load_bundle, private_copy, validate_bundle
from saelora.adapters.config import cache_dir
from saelora.adapters.saes import LoadedSAE

from .engine import EngineError

BASE = "__base__"


def copies_dir() -> Path:
    """This process's folder of private adapter copies, `served-adapters/<pid>`. Copies are per process, so one
    server can delete what it no longer serves without pulling a file from under another (vLLM rereads an
    adapter's folder when it brings it back into a slot). Folders of processes that no longer run are removed."""
    root = cache_dir() / "served-adapters"
    root.mkdir(parents=True, exist_ok=True)
    for d in root.iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid() and not _alive(int(d.name)):
            shutil.rmtree(d, ignore_errors=True)
    return root / str(os.getpid())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def safe_adapter_path(root: str | None, requested: str) -> Path:
    """Resolve `requested` under `root`; refuse anything that escapes it (.., absolute paths, symlinks)."""
    if not root:
        raise EngineError("invalid", "runtime adapter loading is disabled: start the server with --adapter-root",
                          "lora_path")
    if "\x00" in requested:
        raise EngineError("invalid", "lora_path contains a NUL byte", "lora_path")
    real_root = os.path.realpath(root)
    candidate = requested if os.path.isabs(requested) else os.path.join(real_root, requested)
    real = os.path.realpath(candidate)
    if os.path.commonpath([real_root, real]) != real_root or real == real_root:
        raise EngineError("invalid", f"lora_path {requested!r} is outside the adapter root", "lora_path")
    return Path(real)


@dataclass
class AdapterEntry:
    name: str
    bundle: Bundle
    in_flight: int = 0

    def describe(self) -> dict[str, Any]:
        m = self.bundle.manifest
        # The folder's name only: responses never show the server's absolute paths.
        return {"name": self.name, "path": self.bundle.origin or self.bundle.path.name,
                "rank": int(self.bundle.lora_config.get("r", 0)),
                "saes": [s.get("hook", "") for s in m.saes], "in_flight": self.in_flight,
                "metrics": {k: v for k, v in (m.metrics.get("final") or {}).items() if isinstance(v, (int, float))}}


class AdapterRegistry:
    def __init__(self, fingerprint: dict[str, Any], saes: Sequence[LoadedSAE], model: torch.nn.Module,
                 max_adapters: int = 32) -> None:
        self.fingerprint, self.saes, self.model = fingerprint, list(saes), model
        self.max_adapters = max_adapters
        self.entries: dict[str, AdapterEntry] = {}
        self.lock = threading.Lock()
        self.copies = copies_dir()

    def check_new(self, name: str) -> None:
        """`name` may be given to a new adapter: not `__base__`, not loaded. Checked when a load is asked for,
        and again on the engine thread just before attaching (two loads of one name can both pass the first)."""
        if name == BASE:
            raise EngineError("invalid", f"{BASE!r} is reserved for the base model", "lora_name")
        if name in self.entries:
            raise EngineError("conflict", f"an adapter named {name!r} is already loaded", "lora_name")
        if len(self.entries) >= self.max_adapters:
            raise EngineError("conflict", f"{len(self.entries)} adapters are loaded, this server's --max-adapters; "
                              "unload one first", "lora_name")

    def validate(self, name: str, path: Path) -> Bundle:
        self.check_new(name)
        try:
            found = path.is_dir()
        except OSError as e:  # e.g. a name too long for the file system: no bundle can be there
            raise EngineError("not_found", f"no adapter bundle at {path.name[:64]!r} ({e.strerror})",
                              "lora_path") from e
        if not found:
            raise EngineError("not_found", f"no adapter bundle at {path.name!r}", "lora_path")
        problems = validate_bundle(path, self.fingerprint, self.saes, self.model)  # the original's (pickle, ...)
        try:
            if problems:
                raise BundleError(path, problems)
            copy = private_copy(path, self.copies)  # content-addressed: what is served
            bundle = load_bundle(copy, self.fingerprint, self.saes, self.model)
        except BundleError as e:
            raise EngineError("invalid", "invalid adapter bundle: " + "; ".join(e.problems), "lora_path") from e
        return replace(bundle, origin=path.name)

    def add(self, name: str, bundle: Bundle) -> None:
        with self.lock:
            self.entries[name] = AdapterEntry(name, bundle)

    def acquire(self, name: str | None) -> None:
        """Count a request against its adapter (so it cannot be unloaded under the request)."""
        if name is None:
            return
        with self.lock:
            if name not in self.entries:
                raise EngineError("not_found", f"The model `{name}` does not exist.", "model")
            self.entries[name].in_flight += 1

    def release(self, name: str | None) -> None:
        if name is None:
            return
        with self.lock:
            if name in self.entries:
                self.entries[name].in_flight -= 1

    def remove(self, name: str) -> AdapterEntry:
        with self.lock:
            entry = self.entries.get(name)
            if entry is None:
                raise EngineError("not_found", f"no adapter named {name!r} is loaded", "lora_name")
            if entry.in_flight:
                raise EngineError("conflict", f"adapter {name!r} is in use by {entry.in_flight} request(s); "
                                  "retry when they finish", "lora_name")
            return self.entries.pop(name)

    def discard(self, entry: AdapterEntry) -> None:
        """After an unload: delete its private copy unless another loaded name serves the same bytes."""
        with self.lock:
            shared = any(e.bundle.path == entry.bundle.path for e in self.entries.values())
        if not shared and entry.bundle.path.parent == self.copies:
            shutil.rmtree(entry.bundle.path, ignore_errors=True)

    def close(self) -> None:
        """At shutdown: this process's copies go (nothing serves them any more)."""
        shutil.rmtree(self.copies, ignore_errors=True)
