"""Reading a model's safetensors checkpoint without loading the model: its fingerprint, and the few modules an
engine that leaves the weights to vLLM still needs (the final norm and the unembedding, for the logit lens).

The fingerprint is the one `fingerprint_module` gives the model loaded in fp32 (the definition since adapters
were first bundled): the module's state-dict names, floating tensors as fp32. Read from the files it does not
depend on the dtype or device a run loads the model in, so an adapter trained in bf16 on a GPU validates against
the same checkpoint served in fp32 on a CPU. Tied weights (one tensor under two names in the state dict, once in
the file) are found through the model's own parameter sharing, which a meta-device model has too.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from .fingerprint import fingerprint_tensors

log = logging.getLogger(__name__)


def checkpoint_index(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file in `path` that holds it."""
    from safetensors import safe_open

    index: dict[str, Path] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            index.update({k: f for k in st.keys()})  # noqa: SIM118 (safe_open is not a Mapping)
    return index


def aliases(model: torch.nn.Module) -> dict[str, list[str]]:
    """State-dict name -> every name of the same tensor (tied weights share one Parameter object)."""
    groups: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        groups.setdefault(id(t), []).append(name)
    return {n: names for names in groups.values() for n in names}


class _CheckpointTensors(Mapping[str, torch.Tensor]):
    """The model's state dict read lazily from the files, one tensor at a time, as stored."""

    def __init__(self, names: list[str], source: dict[str, tuple[Path, str]]) -> None:
        self.names, self.source = names, source

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file, key = self.source[name]
        with safe_open(str(file), framework="pt") as st:
            return st.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _sources(model: torch.nn.Module, index: dict[str, Path], names: list[str]) -> dict[str, tuple[Path, str]] | None:
    """Where each state-dict name is in the files (directly or through a tied alias); None if one is missing."""
    alias, out = aliases(model), {}
    for n in names:
        key = next((a for a in [n, *alias.get(n, [])] if a in index), None)
        if key is None:
            log.info("checkpoint has no tensor for %s (nor its aliases): fingerprint from the loaded weights", n)
            return None
        out[n] = (index[key], key)
    return out


def fingerprint_checkpoint(path: Path, model: torch.nn.Module, config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The model's fingerprint from its checkpoint files in `path` (`model` may be on the meta device); None when
    the files do not hold every state-dict tensor under the module's names (then only loaded weights can tell)."""
    index = checkpoint_index(path)
    names = list(model.state_dict().keys())
    src = _sources(model, index, names) if index else None
    return None if src is None else fingerprint_tensors(_CheckpointTensors(names, src), config, fp32=True)


def materialise(model: torch.nn.Module, modules: Sequence[torch.nn.Module], path: Path, dtype: torch.dtype,
                device: str = "cpu") -> None:
    """Give `modules` (submodules of the meta-device `model`) real weights from the checkpoint in `path`."""
    index, prefixes = checkpoint_index(path), {id(m): n for n, m in model.named_modules()}
    for module in modules:
        prefix = prefixes[id(module)]
        names = [f"{prefix}.{k}" if prefix else k for k in module.state_dict()]
        src = _sources(model, index, names)
        if src is None:
            raise FileNotFoundError(f"{path}: the checkpoint lacks tensors of {prefix or 'the model'}")
        tensors = _CheckpointTensors(names, src)
        module.to_empty(device=device)
        state = {n.removeprefix(prefix + ".") if prefix else n: (t.to(dtype) if t.is_floating_point() else t)
                 for n, t in ((n, tensors[n]) for n in names)}
        module.load_state_dict(state, strict=True)
