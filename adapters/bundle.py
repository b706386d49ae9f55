"""Adapter bundles: a PEFT LoRA adapter plus a manifest of what it was trained for.

A bundle is a directory:
    adapter_config.json         PEFT's LoraConfig (loadable by `peft.PeftModel.from_pretrained`)
    adapter_model.safetensors   the LoRA weights (safetensors only: pickle is never loaded)
    saelora.json                manifest: format version, base model + fingerprint, each SAE's
                                source/hook/fingerprint, LoRA settings, training summary and metrics
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .errors import SaeloraError
from .fingerprint import compare_fingerprints
from .policy import PositionPolicy
from .saes import LoadedSAE

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MANIFEST = "saelora.json"
FORMAT = "saelora.bundle"
FORMAT_VERSION = 1
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class BundleError(SaeloraError, ValueError):
    """A bundle that cannot be used; `problems` lists every reason at once."""

    def __init__(self, path: str | Path, problems: Sequence[str]) -> None:
        self.path, self.problems = str(path), list(problems)
        super().__init__(f"invalid adapter bundle {path}:\n  - " + "\n  - ".join(self.problems))


@dataclass
class BundleManifest:
    """Contents of saelora.json. `saes` entries are `LoadedSAE.describe()` dicts."""

    base_model: dict[str, Any]  # {"spec": str, "fingerprint": {...}}
    saes: list[dict[str, Any]]
    lora: dict[str, Any] = field(default_factory=dict)  # filled from the PEFT config on save
    training: dict[str, Any] = field(default_factory=dict)  # resolved training config and summary
    metrics: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    saelora_version: str = ""
    created: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BundleManifest":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Bundle:
    """A validated bundle on disk."""

    path: Path
    manifest: BundleManifest
    lora_config: dict[str, Any]
    origin: str = ""  # for a private copy (`private_copy`): the name of the folder it was copied from


def save_bundle(path: str | Path, peft_model: Any, manifest: BundleManifest, adapter_name: str = "default") -> Path:
    """Write `peft_model`'s adapter `adapter_name` and `manifest` as a bundle at `path` (atomically)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from saelora import __version__

    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = peft_model.peft_config[adapter_name]
    cfg.save_pretrained(str(tmp))
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(tmp / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    manifest.lora = {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
                     "use_rslora": bool(cfg.use_rslora), "target_modules": sorted(cfg.target_modules),
                     "layers_to_transform": cfg.layers_to_transform, **manifest.lora}
    manifest.saelora_version = __version__
    manifest.created = manifest.created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    (tmp / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2, default=str))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def _read_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        problems.append(f"missing {path.name}")
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        problems.append(f"{path.name} is not valid JSON ({e})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path.name} is not a JSON object")
        return None
    return data


def _read_weights(path: Path, problems: list[str]) -> dict[str, tuple[int, ...]] | None:
    """Tensor shapes from adapter_model.safetensors, read without loading the tensors."""
    from safetensors import safe_open

    if not path.is_file():
        problems.append(f"missing {path.name}")
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad header
        problems.append(f"{path.name} is not a safetensors file ({type(e).__name__}: {e})")
        return None


# adapter_config.json: the keys a bundle may set (an allow-list). Everything else (DoRA, layer_replication,
# modules_to_save, trainable tokens, LoRA bias, ...) must be absent or neutral: those features change the shared
# model beyond a LoRA delta, or are not served by both engines.
LORA_KEYS = {"peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "layers_to_transform",
             "layers_pattern", "fan_in_fan_out", "bias", "rank_pattern", "alpha_pattern"}
METADATA_KEYS = {"base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version", "task_type",
                 "init_lora_weights", "loftq_config", "megatron_core", "qalora_group_size"}  # no effect on inference


def _check_features(cfg: dict[str, Any], problems: list[str]) -> None:
    """Keys only, never their values: a message must not read back the content of a file it was pointed at."""
    for key, value in sorted(cfg.items()):
        if key not in LORA_KEYS | METADATA_KEYS and value not in (None, False, {}, [], ""):
            problems.append(f"adapter_config.json: {_key(key)} is set, which is not supported; saelora serves plain "
                            f"LoRA (allowed settings: {', '.join(sorted(LORA_KEYS))})")
    if cfg.get("bias", "none") != "none":
        problems.append("adapter_config.json: bias is not 'none', which is not supported")


def _key(key: str) -> str:
    """A config key for a message: bounded, and only when it is a plain identifier."""
    return repr(key) if key.isidentifier() and len(key) <= 64 else "a key"


def _check_lora(cfg: dict[str, Any], manifest: dict[str, Any], shapes: dict[str, tuple[int, ...]] | None,
                problems: list[str]) -> None:
    if cfg.get("peft_type") != "LORA":
        problems.append("adapter_config.json: peft_type is not 'LORA'")
    _check_features(cfg, problems)
    lora = manifest.get("lora", {})
    r, targets = cfg.get("r"), sorted(cfg.get("target_modules") or [])
    if lora.get("r") is not None and lora.get("r") != r:
        problems.append(f"rank mismatch: manifest says r={lora.get('r')}, adapter_config.json says r={r}")
    if lora.get("target_modules") is not None and sorted(lora["target_modules"]) != targets:
        problems.append(f"target mismatch: manifest {sorted(lora['target_modules'])} vs adapter_config.json {targets}")
    for name, shape in (shapes or {}).items():
        module = name.split(".lora_")[0].rsplit(".", 1)[-1]
        if ".lora_" in name and targets and module not in targets:
            problems.append(f"weights hold {name}, but {module!r} is not among target_modules {targets}")
        if ".lora_A." in name and not cfg.get("rank_pattern") and shape[0] != r:
            problems.append(f"rank mismatch: {name} has rank {shape[0]}, adapter_config.json says r={r}")
        if ".lora_A." in name or ".lora_B." in name:  # each half of the pair needs the other, of one rank
            a_side = ".lora_A." in name
            other = name.replace(".lora_A.", ".lora_B.") if a_side else name.replace(".lora_B.", ".lora_A.")
            if other not in shapes:
                problems.append(f"{name} has no {other.rsplit('.', 2)[-2]} beside it")
            elif a_side and shapes[other][-1] != shape[0]:
                problems.append(f"{name} has rank {shape[0]}, {other} has {shapes[other][-1]}")


def _check_targets(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]], problems: list[str]) -> None:
    """Each LoRA tensor must sit on a linear module of the model with matching in/out features."""
    from .hooks import unwrap

    modules = dict(unwrap(model).named_modules())
    for name, shape in shapes.items():
        if ".lora_" not in name:
            continue
        mod_path = name.split(".lora_")[0].removeprefix("base_model.model.")
        mod = modules.get(mod_path)
        base = getattr(mod, "base_layer", mod)
        if not isinstance(base, torch.nn.Linear):
            problems.append(f"{name}: the model has no linear module {mod_path!r}")
        elif ".lora_A." in name and shape[1] != base.in_features:
            problems.append(f"{name}: in_features {shape[1]} != model's {base.in_features}")
        elif ".lora_B." in name and shape[0] != base.out_features:
            problems.append(f"{name}: out_features {shape[0]} != model's {base.out_features}")


def _check_compat(manifest: dict[str, Any], model_fingerprint: Mapping[str, Any] | None,
                  saes: Sequence[LoadedSAE] | None, problems: list[str]) -> None:
    if model_fingerprint is not None:
        want = manifest.get("base_model", {}).get("fingerprint") or {}
        diffs = compare_fingerprints(want, model_fingerprint)
        if diffs:
            spec = manifest.get("base_model", {}).get("spec")
            problems.append(f"wrong base model: bundle was trained on {spec!r} (fingerprint {want.get('id')}), "
                            f"this model is {model_fingerprint.get('id')}; differs in {', '.join(diffs)}")
    if saes is not None:
        by_hook = {s.hook.name: s for s in saes}
        for entry in manifest.get("saes", []):
            s = by_hook.get(entry.get("hook"))
            if s is None:
                problems.append(f"SAE mismatch: bundle was trained with an SAE at {entry.get('hook')!r}, "
                                "none is loaded there")
                continue
            diffs = compare_fingerprints(entry.get("fingerprint") or {}, s.fingerprint)
            if diffs:
                problems.append(f"SAE mismatch at {s.hook.name}: loaded {s.source} differs from the bundle's "
                                f"{entry.get('source')} in {', '.join(diffs)}")
            want = entry.get("policy")
            if want is not None and want != s.policy.to_json():
                problems.append(f"position policy mismatch at {s.hook.name}: the bundle was trained splicing "
                                f"{PositionPolicy.from_json(want).describe()}, the loaded SAE splices "
                                f"{s.policy.describe()}")


MAX_BYTES = {ADAPTER_CONFIG: 1 << 20, MANIFEST: 1 << 20, ADAPTER_WEIGHTS: 4 << 30}  # per file: 1 MiB JSON, 4 GiB


def _check_files(path: Path) -> list[str]:
    """A bundle's files are regular files inside it (a symbolic link could point anywhere on the server) and
    within their size caps."""
    problems = []
    for name, cap in MAX_BYTES.items():
        f = path / name
        if f.is_symlink():
            problems.append(f"{name} is a symbolic link; a bundle's files must be regular files inside it")
        elif f.is_file() and f.stat().st_size > cap:
            problems.append(f"{name} is over {cap} bytes")
    return problems


def validate_bundle(path: str | Path, model_fingerprint: Mapping[str, Any] | None = None,
                    saes: Sequence[LoadedSAE] | None = None, model: torch.nn.Module | None = None) -> list[str]:
    """Every problem with the bundle at `path` (empty list: usable). Optional checks against a model/SAEs."""
    path = Path(path)
    if not path.is_dir():
        return [f"{path} is not a directory"]
    problems = [f"{p.name}: pickle weights are never loaded; save the adapter as safetensors"
                for p in sorted(path.iterdir()) if p.suffix in _PICKLE_SUFFIXES]
    unsafe = _check_files(path)
    if unsafe:  # never read a linked or oversized file
        return problems + unsafe
    cfg = _read_json(path / ADAPTER_CONFIG, problems)
    shapes = _read_weights(path / ADAPTER_WEIGHTS, problems)
    manifest = _read_json(path / MANIFEST, problems)
    if manifest is not None:
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            problems.append(f"{MANIFEST}: its format is not {FORMAT!r} v{FORMAT_VERSION}")
        _check_compat(manifest, model_fingerprint, saes, problems)
    if cfg is not None:
        _check_lora(cfg, manifest or {}, shapes, problems)
    if model is not None and shapes:
        _check_targets(model, shapes, problems)
    return problems


def load_bundle(path: str | Path, model_fingerprint: Mapping[str, Any] | None = None,
                saes: Sequence[LoadedSAE] | None = None, model: torch.nn.Module | None = None) -> Bundle:
    """Validate and read a bundle; raises `BundleError` listing every problem."""
    problems = validate_bundle(path, model_fingerprint, saes, model)
    if problems:
        raise BundleError(path, problems)
    path = Path(path)
    return Bundle(path=path, manifest=read_manifest(path),
                  lora_config=json.loads((path / ADAPTER_CONFIG).read_text()))


BUNDLE_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST)


def private_copy(path: str | Path, root: str | Path) -> Path:
    """Copy a bundle's three files into `root/<sha256 of their bytes>` and return that folder (reused when it
    exists). Each file is read once, and the bytes hashed are the bytes written, so what a server validates and
    loads is exactly what it keeps: later edits of the original, or a retrained bundle at the same path, can
    never reach a loaded adapter, and nothing else (no pickle) is ever next to the weights."""
    path, root = Path(path), Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".incoming-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        digest = hashlib.sha256()
        for name in BUNDLE_FILES:
            if (path / name).is_file():
                data = (path / name).read_bytes()  # read once: the bytes hashed are the bytes written
                (tmp / name).write_bytes(data)
                digest.update(name.encode() + b"\0")
                digest.update(data)
        dest = root / digest.hexdigest()[:32]
        if not dest.is_dir():
            os.replace(tmp, dest)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_manifest(path: str | Path) -> BundleManifest:
    """The manifest of the bundle at `path`, without loading or validating its weights (`BundleError` if it
    is missing or not a JSON object)."""
    problems: list[str] = []
    data = _read_json(Path(path) / MANIFEST, problems)
    if data is None:
        raise BundleError(path, problems)
    return BundleManifest.from_dict(data)


def has_manifest(path: str | Path) -> bool:
    """Whether `path` looks like a bundle (holds a manifest)."""
    return (Path(path) / MANIFEST).is_file()


def attach_bundle(model: torch.nn.Module, bundle: Bundle, adapter_name: str) -> Any:
    """Load `bundle`'s LoRA into `model` under `adapter_name`; returns the PeftModel (wrapping on first use)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.load_adapter(str(bundle.path), adapter_name=adapter_name, is_trainable=False, low_cpu_mem_usage=True)
        return model
    return PeftModel.from_pretrained(model, str(bundle.path), adapter_name=adapter_name, is_trainable=False,
                                     low_cpu_mem_usage=True)


@dataclass(frozen=True)
class LoRAWeights:
    """One module's LoRA delta for inputs x (..., in): `x @ a @ b`, with a (in, r) and b (r, out) the transposes
    of PEFT's lora_A / lora_B weights (row-major for the matmul), the adapter's scale folded into b."""

    a: torch.Tensor
    b: torch.Tensor

    @property
    def rank(self) -> int:
        return self.a.shape[1]


def lora_weights(bundle: Bundle, model: torch.nn.Module) -> dict[str, LoRAWeights]:
    """A validated bundle's LoRA for each linear module of `model` (unwrapped) it adapts, by module path, in the
    module's dtype; without building a PEFT model. Which modules, and each one's rank and alpha, are resolved
    with PEFT's own functions, as `PeftModel.from_pretrained` resolves them (tests/serve/test_engine_parts.py)."""
    import math

    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    from .hooks import unwrap

    cfg = LoraConfig.from_pretrained(str(bundle.path))
    state = load_file(str(bundle.path / ADAPTER_WEIGHTS))
    modules = dict(unwrap(model).named_modules())
    out = {}
    for key in state:
        if not key.endswith(".lora_A.weight"):
            continue
        path = key.removesuffix(".lora_A.weight").removeprefix("base_model.model.")
        if not check_target_module_exists(cfg, path):
            continue  # PEFT would not put a layer there, so these weights would not be loaded
        r = cfg.rank_pattern.get(get_pattern_key(cfg.rank_pattern.keys(), path), cfg.r)
        alpha = cfg.alpha_pattern.get(get_pattern_key(cfg.alpha_pattern.keys(), path), cfg.lora_alpha)
        scale = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
        dtype = modules[path].weight.dtype
        a, b = state[key], state[key.replace(".lora_A.", ".lora_B.")]
        out[path] = LoRAWeights(a.to(dtype).T.contiguous(), (b.to(dtype) * scale).T.contiguous())
    return out


def detach_adapter(peft_model: Any, adapter_name: str) -> torch.nn.Module:
    """Remove adapter `adapter_name`; returns the model to use from now on.

    PEFT cannot hold zero adapters, so removing the last one unloads the LoRA layers entirely and
    returns the plain base model with its original modules (outputs identical to before attaching).
    """
    if adapter_name not in peft_model.peft_config:
        raise KeyError(f"no adapter named {adapter_name!r}")
    if set(peft_model.peft_config) == {adapter_name}:
        return peft_model.unload()
    peft_model.delete_adapter(adapter_name)
    return peft_model
