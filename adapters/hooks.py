"""Where an SAE sits in a model: hook names resolved onto the loaded model's decoder layers.

Accepted names (L is a layer index):
- TransformerLens: `blocks.L.hook_resid_post` (output of decoder layer L) and
  `blocks.L.hook_resid_pre` (input of decoder layer L, i.e. the output of layer L-1).
- HF module paths of a decoder layer, e.g. `model.layers.L` (llama, gemma, qwen, mistral)
  or `transformer.h.L` (gpt2); these mean the layer's output (resid_post). A path may
  carry PEFT's `base_model.model.` prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import SaeloraError

_TL = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")
_TL_OTHER = re.compile(r"^blocks\.\d+\.(.*hook_\w+)$")  # TransformerLens hooks that are not the residual stream
# Attribute paths, from the causal-LM wrapper, to the list of decoder layers of known families.
_LAYER_LISTS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers",
                "model.language_model.layers")


class HookError(SaeloraError, ValueError):
    """An SAE hook that does not exist on the model or does not fit it."""


@dataclass(frozen=True)
class HookPoint:
    """A point in the residual stream: the input (`pre`) or output (`post`) of decoder layer `layer`."""

    layer: int
    kind: Literal["pre", "post"]

    @property
    def name(self) -> str:
        """Canonical TransformerLens name of this point."""
        return f"blocks.{self.layer}.hook_resid_{self.kind}"

    @property
    def depth(self) -> int:
        """Number of decoder layers that run before this point."""
        return self.layer + 1 if self.kind == "post" else self.layer


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain transformers model under a PEFT wrapper (or the model itself)."""
    while hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _get_attr_path(obj: object, path: str) -> object | None:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _find_layers(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.ModuleList]:
    base = unwrap(model)
    for path in _LAYER_LISTS:
        layers = _get_attr_path(base, path)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            owner = _get_attr_path(base, path.rsplit(".", 1)[0]) if "." in path else base
            return owner, layers  # type: ignore[return-value]
    raise HookError(
        f"Cannot find the decoder layers of {type(base).__name__}; supported layouts: "
        + ", ".join(_LAYER_LISTS)
    )


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of decoder layers (llama-, gemma-, qwen-, mistral- and gpt2-style models)."""
    return _find_layers(model)[1]


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The module that owns the decoder layers (e.g. `LlamaModel`); it sees input_ids and attention_mask."""
    return _find_layers(model)[0]


def hidden_size(model: torch.nn.Module) -> int:
    cfg = unwrap(model).config
    size = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if size is None and hasattr(cfg, "get_text_config"):
        size = cfg.get_text_config().hidden_size
    return int(size)


def resolve_hook(model: torch.nn.Module, hook_name: str) -> HookPoint:
    """Map a hook name (TransformerLens or HF module path) onto a `HookPoint` of this model."""
    layers = decoder_layers(model)
    n = len(layers)
    m = _TL.match(hook_name)
    other = _TL_OTHER.match(hook_name)
    if m:
        point = HookPoint(int(m.group(1)), m.group(2))  # type: ignore[arg-type]
    elif other:
        raise HookError(f"Hook {hook_name!r} ({other.group(1)}) is not supported: saelora splices SAEs of the "
                        "residual stream only (blocks.L.hook_resid_pre / blocks.L.hook_resid_post).")
    else:
        point = _resolve_module_path(model, layers, hook_name)
    if not 0 <= point.layer < n:
        raise HookError(f"Hook {hook_name!r} names layer {point.layer}, but the model has {n} layers (0..{n - 1}).")
    return point


def _resolve_module_path(model: torch.nn.Module, layers: torch.nn.ModuleList, hook_name: str) -> HookPoint:
    path = hook_name
    for prefix in ("base_model.model.",):
        if path.startswith(prefix):
            path = path[len(prefix):]
    target = _get_attr_path(unwrap(model), path) if re.fullmatch(r"[\w.]+", path) else None
    for i, layer in enumerate(layers):
        if target is layer:
            return HookPoint(i, "post")
    raise HookError(
        f"Unknown hook {hook_name!r}: expected blocks.L.hook_resid_post, blocks.L.hook_resid_pre, "
        "or the module path of a decoder layer (e.g. model.layers.L)."
    )


def check_d_in(model: torch.nn.Module, d_in: int, what: str) -> None:
    """Raise when an SAE's input width does not match the model's residual stream."""
    d_model = hidden_size(model)
    if d_in != d_model:
        raise HookError(f"{what}: d_in={d_in} does not match the model's hidden size {d_model}.")
