"""Content fingerprints for models and SAEs, recorded in adapter manifests.

A fingerprint is a small JSON-able dict: a digest of the config, a digest of the tensor
layout (names, shapes, dtypes) and a digest of the tensor bytes, combined into `id`.
Two objects with the same `id` hold the same config and the same weights.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import torch

# Keys that change with the tool or the machine, not with the model itself.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype",
                         "quantization_config", "device", "sae_lens_version", "sae_lens_training_version"}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _clean_config(config: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in config.items():
        if k in _VOLATILE_CONFIG_KEYS:
            continue
        out[k] = _clean_config(v) if isinstance(v, Mapping) else v
    return out


def fingerprint_tensors(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                        fp32: bool = False) -> dict[str, Any]:
    """Fingerprint a set of named tensors plus their config.

    Tensors are hashed in sorted-name order from their raw bytes (contiguous CPU copies),
    so the digest does not depend on device or on module registration order. `fp32`: floating tensors are
    hashed as fp32 (one at a time), as a model's fingerprint is defined (adapters/checkpoint.py).
    """
    cfg_digest = _sha(json.dumps(_clean_config(config), sort_keys=True, default=str).encode())
    layout = hashlib.sha256()
    content = hashlib.sha256()
    n_params = 0
    for name in sorted(tensors):
        t = tensors[name].detach()
        t = t.float() if fp32 and t.is_floating_point() else t
        layout.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        cpu = t.to("cpu").contiguous()
        content.update(cpu.view(torch.uint8).numpy().tobytes() if cpu.numel() else b"")
        n_params += t.numel()
    parts = {"config_sha256": cfg_digest, "layout_sha256": layout.hexdigest(),
             "content_sha256": content.hexdigest()}
    fid = _sha("".join(parts[k] for k in sorted(parts)).encode())[:16]
    return {"id": fid, "n_params": n_params, **parts}


def fingerprint_module(module: torch.nn.Module, config: Mapping[str, Any], fp32: bool = False) -> dict[str, Any]:
    """Fingerprint a module's state dict (tied weights hashed once per name) plus its config."""
    return fingerprint_tensors(dict(module.state_dict()), config, fp32=fp32)


def compare_fingerprints(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints; empty when they match."""
    if expected.get("id") == actual.get("id"):
        return []
    what = {"config_sha256": "config", "layout_sha256": "tensor names/shapes/dtypes",
            "content_sha256": "weights"}
    diffs = [label for key, label in what.items() if expected.get(key) != actual.get(key)]
    return diffs or ["fingerprint id"]
