"""Loading SAEs through sae-lens and placing them on a model.

An SAE is a sae-lens folder (`cfg.json` + `sae_weights.safetensors`) or, when online, a
`release:sae_id` pair from sae-lens's pretrained list. Any inference architecture sae-lens ships
(standard, topk, jumprelu, gated, ...) works: the splice only calls the SAE's own encode/decode.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import SaeloraError
from .fingerprint import fingerprint_module
from .hooks import HookError, HookPoint, check_d_in, resolve_hook

SAE_CFG = "cfg.json"
SAE_WEIGHTS = "sae_weights.safetensors"
# sae-lens architectures that do not reconstruct their own input (they map one point to another).
_NOT_RESIDUAL = ("transcoder",)


class SAELoadError(SaeloraError, RuntimeError):
    """An SAE spec that cannot be resolved or loaded."""


@dataclass
class LoadedSAE:
    """An SAE placed at a hook point of a specific model."""

    name: str
    sae: Any  # sae_lens.SAE
    hook: HookPoint
    source: str
    fingerprint: dict[str, Any]

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def d_in(self) -> int:
        return int(self.sae.cfg.d_in)

    @property
    def architecture(self) -> str:
        return str(self.sae.cfg.architecture())

    def describe(self) -> dict[str, Any]:
        """JSON-able summary, as manifests and the server's /v1/saes record it."""
        return {"name": self.name, "source": self.source, "hook": self.hook.name,
                "architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae,
                "fingerprint": self.fingerprint}


def sae_hook_name(sae: Any) -> str | None:
    """The hook an SAE was trained on, from its sae-lens metadata."""
    return sae.cfg.metadata.hook_name


def read_sae(spec: str, device: str = "cpu", dtype: str = "float32") -> tuple[Any, str]:
    """Load a sae-lens SAE from a folder, or `release:sae_id` when online. Returns (sae, source)."""
    from sae_lens import SAE

    path = Path(spec).expanduser()
    if path.is_dir():
        missing = [f for f in (SAE_CFG, SAE_WEIGHTS) if not (path / f).is_file()]
        if missing:
            raise SAELoadError(f"{path} is not a sae-lens folder: missing {', '.join(missing)}.")
        arch = json.loads((path / SAE_CFG).read_text()).get("architecture", "standard")
        if any(tag in arch for tag in _NOT_RESIDUAL):
            raise SAELoadError(f"{path}: architecture {arch!r} is not an SAE of one residual point; not spliceable.")
        sae = SAE.load_from_disk(path, device=device, dtype=dtype)
        return sae.eval().requires_grad_(False), str(path.resolve())
    if ":" in spec:
        from .models import hub_reachable

        release, sae_id = spec.split(":", 1)
        if not hub_reachable():
            raise SAELoadError(f"SAE {spec!r} is a sae-lens release, but the hub cannot be reached (offline).")
        sae = SAE.from_pretrained(release, sae_id, device=device, dtype=dtype)
        return sae.eval().requires_grad_(False), spec
    raise SAELoadError(f"SAE {spec!r}: not a sae-lens folder and not of the form release:sae_id.")


def place_sae(model: torch.nn.Module, sae: Any, source: str, name: str | None = None,
              hook: str | None = None) -> LoadedSAE:
    """Resolve an SAE's hook on `model` (from its metadata unless `hook` is given) and check its width."""
    hook_name = hook or sae_hook_name(sae)
    if not hook_name:
        raise HookError(f"SAE {source}: its cfg.json names no hook (metadata.hook_name); pass hook= explicitly.")
    point = resolve_hook(model, hook_name)
    check_d_in(model, int(sae.cfg.d_in), f"SAE {source}")
    sae_name = name or point.name
    fp = fingerprint_module(sae, sae.cfg.to_dict())
    return LoadedSAE(name=sae_name, sae=sae, hook=point, source=source, fingerprint=fp)


def load_sae(model: torch.nn.Module, spec: str, name: str | None = None, hook: str | None = None) -> LoadedSAE:
    """Load an SAE (folder or release:id) onto `model`'s device and dtype and place it at its hook."""
    p = next(model.parameters())
    dtype = str(p.dtype).removeprefix("torch.")
    sae, source = read_sae(spec, device=str(p.device), dtype=dtype)
    return place_sae(model, sae, source, name=name, hook=hook)
