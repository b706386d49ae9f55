"""LoRA settings resolved onto a concrete model: target modules per architecture, layers, rank."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from saelora.adapters.errors import SaeloraError
from saelora.adapters.hooks import HookPoint, decoder_layers, unwrap
from saelora.adapters.lora_targets import TARGET_NAMES, target_table

from .config import LoraSettings

DEFAULT_TARGETS = TARGET_NAMES

__all__ = ["LoraSettings", "add_lora", "lora_config", "resolve_layers", "resolve_targets"]

class LoraSetupError(SaeloraError, ValueError):
    """LoRA settings that do not fit the model."""


def resolve_targets(model: torch.nn.Module, targets: Sequence[str]) -> list[str]:
    """Module-name suffixes for `targets` on this model (short names mapped per architecture)."""
    model_type = unwrap(model).config.model_type
    table = target_table(model_type)
    resolved = []
    for t in targets:
        name = table.get(t, t)
        if t in TARGET_NAMES and t not in table:
            continue  # e.g. no gate in gpt2
        if name not in resolved:
            resolved.append(name)
    names = [n for n, _ in unwrap(model).named_modules()]
    missing = [r for r in resolved if not any(n == r or n.endswith("." + r) for n in names)]
    if missing or not resolved:
        raise LoraSetupError(f"LoRA targets {missing or list(targets)} match no module of this {model_type} model")
    return resolved


def resolve_layers(model: torch.nn.Module, layers: str | Sequence[int],
                   points: Sequence[HookPoint]) -> list[int] | None:
    """Decoder-layer indices to adapt (None = all). `after` = the layers after the first SAE's hook."""
    n = len(decoder_layers(model))
    if layers == "all":
        return None
    if layers == "after":
        if not points:
            raise LoraSetupError("layers='after' needs at least one SAE")
        first = min(p.depth for p in points)
        if first >= n:
            raise LoraSetupError("layers='after': the SAE sits after the last layer; no layer to adapt")
        return list(range(first, n))
    if isinstance(layers, str):
        raise LoraSetupError(f"layers must be 'all', 'after' or a list of ints, got {layers!r}")
    out = sorted(set(int(i) for i in layers))
    if not out or out[0] < 0 or out[-1] >= n:
        raise LoraSetupError(f"layers {list(layers)} outside 0..{n - 1}")
    return out


def lora_config(model: torch.nn.Module, settings: LoraSettings, points: Sequence[HookPoint]) -> Any:
    """A `peft.LoraConfig` for `model` from `settings`; `points` are the SAE hook points (for 'after')."""
    from peft import LoraConfig

    layers = resolve_layers(model, settings.layer_spec(), points)
    layers_attr = _layers_pattern(model)
    is_gpt2 = unwrap(model).config.model_type == "gpt2"
    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      use_rslora=settings.rslora, target_modules=resolve_targets(model, settings.targets),
                      layers_to_transform=layers, layers_pattern=layers_attr if layers is not None else None,
                      fan_in_fan_out=is_gpt2, bias="none", task_type="CAUSAL_LM", **settings.extra)


def _layers_pattern(model: torch.nn.Module) -> str:
    layers = decoder_layers(model)
    for name, module in unwrap(model).named_modules():
        if module is layers:
            return name.rsplit(".", 1)[-1]
    return "layers"


def add_lora(model: torch.nn.Module, settings: LoraSettings, points: Sequence[HookPoint],
             adapter_name: str = "default") -> Any:
    """Wrap `model` in a PeftModel with a fresh trainable LoRA adapter; base weights frozen."""
    from peft import get_peft_model

    cfg = lora_config(model, settings, points)
    peft_model = get_peft_model(model, cfg, adapter_name=adapter_name)
    return peft_model

