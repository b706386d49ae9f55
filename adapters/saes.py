"""Loading SAEs through sae-lens and placing them on a model.

An SAE is a sae-lens folder (`cfg.json` + `sae_weights.safetensors`) or, when online, a
`release:sae_id` pair from sae-lens's pretrained list. Any inference architecture sae-lens ships
(standard, topk, jumprelu, gated, ...) works: the splice only calls the SAE's own encode/decode.

SAEs always compute in fp32, whatever the model's dtype (`LoadedSAE.encode/decode` cast). The
conventions a sae-lens SAE was trained under are honoured or refused here, in one place:
- `normalize_activations: expected_average_only_in`: the scaling factor is folded into the weights,
  from the folder's `activation_scaler.json` (sae-lens checkpoints) or estimated on the embedded
  corpus the way sae-lens's trainer does (sqrt(d_in) / mean norm);
- `model_from_pretrained_kwargs.center_writing_weights` (TransformerLens centring): the SAE reads
  x - mean(x) and the mean is added back to its output; kwargs that leave the residual stream as the
  HF model has it are accepted, any other is refused;
- `prepend_bos` and BOS/EOS: the SAE's position policy (adapters/policy.py);
- `model_name` differing from the model it is placed on: a warning naming both;
- hooks other than the residual stream: refused with the hook named.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import EMBEDDED_CORPUS
from .errors import SaeloraError
from .fingerprint import fingerprint_module
from .hooks import HookError, HookPoint, check_d_in, resolve_hook
from .policy import PositionPolicy, apply_override, policy_from_metadata

log = logging.getLogger(__name__)
SAE_CFG = "cfg.json"
SAE_WEIGHTS = "sae_weights.safetensors"
SCALER_FILE = "activation_scaler.json"  # sae-lens training checkpoints keep the norm scaling factor here
# TransformerLens from_pretrained kwargs that leave the residual stream as the HF model computes it.
_NEUTRAL_TL_KWARGS = ("fold_ln", "fold_value_biases", "center_unembed", "refactor_factored_attn_matrices",
                      "default_prepend_bos", "dtype", "device", "n_devices", "move_to_device", "trust_remote_code")
_SUPPORTED_NORMS = ("none", None, "layer_norm", "constant_norm_rescale", "expected_average_only_in")
# sae-lens architectures that do not reconstruct their own input (they map one point to another).
_NOT_RESIDUAL = ("transcoder",)


class SAELoadError(SaeloraError, RuntimeError):
    """An SAE spec that cannot be resolved or loaded."""


@dataclass
class LoadedSAE:
    """An SAE placed at a hook point of a specific model."""

    name: str
    sae: Any  # sae_lens.SAE, fp32
    hook: HookPoint
    source: str
    fingerprint: dict[str, Any]
    policy: PositionPolicy = field(default_factory=lambda: PositionPolicy(keep_first=False))
    center: bool = False  # TransformerLens centring: the SAE sees x - mean(x) over d_model
    folded_scale: float | None = None  # activation scaling factor estimated and folded in at load (else None)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (..., d_sae) in fp32 of a residual stream x (..., d) of any dtype."""
        x = x.float()
        if self.center:
            x = x - x.mean(-1, keepdim=True)
        return self.sae.encode(x)

    def decode(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of x from latents z, in x's dtype (x also feeds stateful input norms and centring)."""
        xf = x.float()
        mean = xf.mean(-1, keepdim=True) if self.center else None
        if self.sae.cfg.normalize_activations in ("layer_norm", "constant_norm_rescale"):
            self.sae.encode(xf - mean if mean is not None else xf)  # these keep the input's norm for decode
        out = self.sae.decode(z)
        return (out + mean if mean is not None else out).to(x.dtype)

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
                "fingerprint": self.fingerprint, "policy": self.policy.to_json(), "center": self.center}


# SAEs shipped inside the package (cli/data/saes/<folder>, installed as saelora/data/saes/), per embedded model:
# trained by the command in the folder's README.md, with their held-out quality in cfg.json's metadata.
SHIPPED_SAES = {"smollm2-135m": "smollm2-135m-L12-topk", "gemma3-270m": "gemma3-270m-L7-topk"}


def shipped_sae(model: str) -> Path:
    """The folder of the SAE shipped for embedded model `model`."""
    if model not in SHIPPED_SAES:
        raise SAELoadError(f"no SAE is shipped for model {model!r} (shipped: {sorted(SHIPPED_SAES)}); "
                           "train one with `saelora train-sae` and pass its folder.")
    from importlib.resources import files

    return Path(str(files("saelora"))) / "data" / "saes" / SHIPPED_SAES[model]


def sae_hook_name(sae: Any) -> str | None:
    """The hook an SAE was trained on, from its sae-lens metadata."""
    return sae.cfg.metadata.hook_name


def read_sae(spec: str, device: str = "cpu") -> tuple[Any, str]:
    """Load a sae-lens SAE (fp32) from a folder, or `release:sae_id` when online. Returns (sae, source).

    A folder's `activation_scaler.json` (sae-lens checkpoints) is folded into the weights here."""
    from sae_lens import SAE

    path = Path(spec).expanduser()
    if path.is_dir():
        missing = [f for f in (SAE_CFG, SAE_WEIGHTS) if not (path / f).is_file()]
        if missing:
            raise SAELoadError(f"{path} is not a sae-lens folder: missing {', '.join(missing)}.")
        arch = json.loads((path / SAE_CFG).read_text()).get("architecture", "standard")
        if any(tag in arch for tag in _NOT_RESIDUAL):
            raise SAELoadError(f"{path}: architecture {arch!r} is not an SAE of one residual point; not spliceable.")
        sae = SAE.load_from_disk(path, device=device, dtype="float32")
        scaler = path / SCALER_FILE
        if sae.cfg.normalize_activations == "expected_average_only_in" and scaler.is_file():
            factor = json.loads(scaler.read_text()).get("scaling_factor")
            if factor is not None:
                sae.fold_activation_norm_scaling_factor(float(factor))
        return sae.eval().requires_grad_(False), str(path.resolve())
    if ":" in spec:
        from .models import hub_reachable

        release, sae_id = spec.split(":", 1)
        if not hub_reachable():
            raise SAELoadError(f"SAE {spec!r} is a sae-lens release, but the hub cannot be reached (offline).")
        sae = SAE.from_pretrained(release, sae_id, device=device, dtype="float32")
        return sae.eval().requires_grad_(False), spec
    raise SAELoadError(f"SAE {spec!r}: not a sae-lens folder and not of the form release:sae_id.")


def _centring(sae: Any, source: str) -> bool:
    """Whether the SAE was trained on TransformerLens-centred activations; refuse kwargs that change the stream."""
    kwargs = dict(getattr(sae.cfg.metadata, "model_from_pretrained_kwargs", None) or {})
    center = bool(kwargs.pop("center_writing_weights", False))
    unknown = sorted(k for k in kwargs if k not in _NEUTRAL_TL_KWARGS)
    if unknown:
        raise SAELoadError(f"SAE {source}: model_from_pretrained_kwargs {unknown} change the residual stream the SAE "
                           "was trained on, and saelora cannot reproduce them on a Hugging Face model.")
    if sae.cfg.normalize_activations not in _SUPPORTED_NORMS:
        raise SAELoadError(f"SAE {source}: normalize_activations={sae.cfg.normalize_activations!r} is not supported.")
    return center


def _check_model_name(sae: Any, model: torch.nn.Module, source: str) -> None:
    want = getattr(sae.cfg.metadata, "model_name", None)
    have = str(getattr(getattr(model, "config", None), "name_or_path", "") or "")
    if not want or not have:
        return
    norm = lambda n: n.lower().rsplit("/", 1)[-1].replace("_", "-")  # noqa: E731
    if norm(want) not in norm(have) and norm(have) not in norm(want):
        log.warning("SAE %s was trained on model %r, but it is being placed on %r: its reconstructions may be "
                    "meaningless on this model.", source, want, have)


def _fold_estimated_norm(loaded: LoadedSAE, model: torch.nn.Module, tokenizer: Any,
                         rows: torch.Tensor | None) -> None:
    """sae-lens's `expected_average_only_in` without a saved factor: estimate sqrt(d_in) / mean ||x|| on `rows`
    (default: 32 held-out rows of the embedded corpus) at the positions of the SAE's policy, and fold it into
    the weights, as sae-lens's trainer does at the end of training."""
    from .activations import run_to_hook
    from .corpus import CorpusConfig, load_corpus

    if any(p.is_meta for p in model.parameters()):
        raise SAELoadError(f"SAE {loaded.source}: normalize_activations='expected_average_only_in' needs its "
                           f"scaling factor ({SCALER_FILE} in the folder); the vLLM engine reads the model without "
                           "its weights and cannot estimate one (the torch engine can: docs/scaling.md).")
    if rows is None and tokenizer is None:
        raise SAELoadError(f"SAE {loaded.source}: normalize_activations='expected_average_only_in' needs its "
                           f"scaling factor ({SCALER_FILE} in the folder) or a tokenizer to estimate it with.")
    if rows is None:
        rows = load_corpus(tokenizer, CorpusConfig(sources=(EMBEDDED_CORPUS,), seq_len=128,
                                                   prepend_bos=loaded.policy.prepend_bos)).val[:32]
    with torch.no_grad():
        x = run_to_hook(model, loaded.hook, rows.to(next(model.parameters()).device)).float()
        keep = loaded.policy.keep_in_rows(rows, x)
        if loaded.center:
            x = x - x.mean(-1, keepdim=True)
        mean_norm = float(x[~keep].norm(dim=-1).mean())
    factor = math.sqrt(loaded.d_in) / mean_norm
    loaded.sae.fold_activation_norm_scaling_factor(factor)
    loaded.folded_scale = factor
    log.info("SAE %s: folded an estimated activation scaling factor %.4g (%d calibration rows)",
             loaded.source, factor, len(rows))


def place_sae(model: torch.nn.Module, sae: Any, source: str, name: str | None = None, hook: str | None = None,
              tokenizer: Any = None, policy: str | PositionPolicy | None = None,
              calibration: torch.Tensor | None = None) -> LoadedSAE:
    """Resolve an SAE's hook on `model` (from its metadata unless `hook` is given), check its width and model,
    and settle its conventions (see the module docstring).

    policy: a `PositionPolicy`, or an override string (`keep_first=0,keep_ids=1+2,prepend_bos=1`) applied to
    the recorded or derived one. Without a tokenizer and a recorded policy, every position is spliced.
    calibration: token rows (N, T) to estimate a missing activation scaling factor on."""
    hook_name = hook or sae_hook_name(sae)
    if not hook_name:
        raise HookError(f"SAE {source}: its cfg.json names no hook (metadata.hook_name); pass hook= explicitly.")
    point = resolve_hook(model, hook_name)
    check_d_in(model, int(sae.cfg.d_in), f"SAE {source}")
    _check_model_name(sae, model, source)
    center = _centring(sae, source)
    if isinstance(policy, PositionPolicy):
        pol = policy
    elif tokenizer is not None or getattr(sae.cfg.metadata, "saelora_policy", None):
        pol = apply_override(policy_from_metadata(sae.cfg.metadata, tokenizer), policy)
    else:
        pol = apply_override(PositionPolicy(keep_first=False), policy)
    loaded = LoadedSAE(name=name or point.name, sae=sae, hook=point, source=source, fingerprint={}, policy=pol,
                       center=center)
    if sae.cfg.normalize_activations == "expected_average_only_in":
        _fold_estimated_norm(loaded, model, tokenizer, calibration)
    loaded.fingerprint = fingerprint_module(sae, sae.cfg.to_dict())
    return loaded


def load_sae(model: torch.nn.Module, spec: str, name: str | None = None, hook: str | None = None,
             tokenizer: Any = None, policy: str | PositionPolicy | None = None,
             calibration: torch.Tensor | None = None) -> LoadedSAE:
    """Load an SAE (folder or release:id) in fp32 onto `model`'s device and place it at its hook (see place_sae)."""
    device = next(model.parameters()).device
    sae, source = read_sae(spec, device="cpu" if device.type == "meta" else str(device))  # meta: a skeleton model
    return place_sae(model, sae, source, name=name, hook=hook, tokenizer=tokenizer, policy=policy,
                     calibration=calibration)
