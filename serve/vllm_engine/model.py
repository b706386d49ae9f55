"""vLLM model classes with SAEs spliced into the residual stream.

`Saelora<Arch>` subclasses vLLM's own `<Arch>` (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3) and wraps the
forward of the decoder layer at each SAE's hook. vLLM decoder layers return `(hidden, residual)` with the
residual add fused into the next layer's norm, so the true residual stream is `hidden + residual`:

    resid_post of layer L:  x = h + r  ->  x' = splice(x)  ->  return (x', 0)
    resid_pre of layer L:   x = h + r  ->  x' = splice(x)  ->  layer(x', residual=None)

Only requests whose settings need it are touched (`RowSpec.needs`); when no request in the batch needs
the SAE, the layer's output is returned as it is, so `off` and `error_term` without edits are exactly the
base model. The splice itself is `saelora.adapters.splice.splice_sae` (the function the torch engine's hooks
call), called once per request on that request's token range with its own rows/positions/top_k.

Each SAE's position policy (adapters/policy.py) needs the token ids of the flat batch: the mixin's own forward
(outside the compiled backbone) hands `input_ids` to the runtime before the layers run.

The SAEs come from the model config: the engine passes `hf_overrides={"architectures": ["Saelora..."],
"saelora_saes": [{"name", "path", "layer", "kind", "policy", "center", "folded_scale"}, ...]}`.

The wrapped layer calls the splice through one opaque op (`splice_op.py`) on every forward, so vLLM compiles the
model around it (its default on CPU; piecewise CUDA graphs on GPU, the op a splitting op like attention): the
per-request Python below runs inside the op, at run time, with the batch's real layout.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import torch
from vllm.forward_context import get_forward_context, is_forward_context_available

from saelora.adapters.hooks import HookPoint
from saelora.adapters.policy import PositionPolicy
from saelora.adapters.saes import LoadedSAE, read_sae
from saelora.adapters.edits import SERVE_MODE
from saelora.adapters.splice import fit_positions, splice_sae

from . import ARCHITECTURES, spliced_architecture, splice_op, tracker
from ..core.packed import pack_sae_encoder

log = logging.getLogger(__name__)


def _slot_ranges() -> list[int] | None:
    """query_start_loc of the current forward (num_reqs + 1 offsets), or None outside a real batch."""
    if not is_forward_context_available():
        return None
    meta = get_forward_context().attn_metadata
    if isinstance(meta, list):
        meta = meta[0] if meta else None
    if not meta:
        return None
    first = next(iter(meta.values())) if isinstance(meta, dict) else meta
    qsl = getattr(first, "query_start_loc", None)
    return qsl.tolist() if isinstance(qsl, torch.Tensor) else None


class SpliceRuntime:
    """The SAEs of one model and the per-request splice over vLLM's flat token batch."""

    def __init__(self, saes: list[LoadedSAE]) -> None:
        self.saes = {s.name: s for s in saes}
        self.sae_names = [s.name for s in saes]  # the op's `sae` argument indexes this
        self.handle = splice_op.register_runtime(self)
        self.ids: torch.Tensor | None = None  # (N,) token ids of the current forward (None: prompt embeddings)

    def __call__(self, name: str, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """x: (N, d) residual stream at SAE `name`'s hook; positions: (N,). The new stream, or None if unchanged.

        Requests with one token in this forward (decoding) go through the SAE together, one row per request;
        requests with several (prefill chunks) go one by one, as a row of their own length."""
        qsl = _slot_ranges()
        if not tracker.SLOTS:
            return None
        if qsl is None:
            if any(spec.row.needs(name, SERVE_MODE) for spec in tracker.SLOTS.values()):
                # Never serve a request its edits or latents silently without them (e.g. FlashInfer metadata).
                raise RuntimeError("this attention backend gives no query_start_loc: the SAE splice cannot place "
                                   "requests in the batch; use vLLM's default backend")
            return None
        singles: list[tuple[int, tracker.SlotSpec]] = []  # (token index, spec)
        out = None
        for slot in range(len(qsl) - 1):
            spec = tracker.SLOTS.get(slot)
            a, b = qsl[slot], qsl[slot + 1]
            if spec is None or b <= a or not spec.row.needs(name, SERVE_MODE):
                continue
            if b - a == 1:
                singles.append((a, spec))
                continue
            y = self._rows(name, x[None, a:b], positions[None, a:b], [spec], (None, slice(a, b)))[0]  # (T, d)
            if spec.row.changes_stream(name, SERVE_MODE):
                out = x.clone() if out is None else out
                out[a:b] = y
        if singles:
            idx = torch.tensor([i for i, _ in singles], device=x.device)
            specs = [s for _, s in singles]
            y = self._rows(name, x[idx][:, None], positions[idx][:, None], specs, (idx, None))[:, 0]  # (S, d)
            changed = torch.tensor([s.row.changes_stream(name, SERVE_MODE) for s in specs], device=x.device)
            if bool(changed.any()):
                out = x.clone() if out is None else out
                out[idx[changed]] = y[changed]
        return out

    def _rows(self, name: str, x: torch.Tensor, pos: torch.Tensor, specs: list[tracker.SlotSpec],
              idx: Any) -> torch.Tensor:
        """Splice x (R, T, d) at positions (R, T), row r with specs[r]; record each row's own top-k latents.
        idx indexes the flat batch's token ids into the same (R, T) shape."""
        ids = None if self.ids is None else self.ids[idx]
        res = splice_sae(self.saes[name], x, fit_positions(pos, x.shape[0], x.shape[1], x.device), ids,
                         [s.row for s in specs], mode=SERVE_MODE, top_k=max(s.row.top_k for s in specs))
        cap = res.capture
        for r, s in enumerate(specs):
            k = s.row.top_k
            if cap is not None and k:
                tracker.record(s.rid, name, cap.positions[r], cap.indices[r, :, :k], cap.values[r, :, :k])
            if res.stops is not None and bool(res.stops[r].any()):
                tracker.record_stops(s.rid, pos[r][res.stops[r]].tolist())
        return res.out


def _wrap_layer(layer: torch.nn.Module, runtime: SpliceRuntime, name: str, kind: str) -> None:
    """Splice at this layer through the op, unconditionally: nothing here depends on the batch, so a compiler
    traces it once (the op decides per batch, at run time)."""
    inner, handle, sae = layer.forward, runtime.handle, runtime.sae_names.index(name)

    def forward_post(positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                     *args: Any, **kwargs: Any) -> Any:
        h, r = inner(positions, hidden_states, residual, *args, **kwargs)
        x = h if r is None else h + r  # (N, d): the residual stream after this layer
        y = torch.ops.saelora.splice(x, positions, handle, sae)
        return y, torch.zeros_like(y)

    def forward_pre(positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                    *args: Any, **kwargs: Any) -> Any:
        x = hidden_states if residual is None else hidden_states + residual  # (N, d): this layer's input
        return inner(positions, torch.ops.saelora.splice(x, positions, handle, sae), None, *args, **kwargs)

    layer.forward = forward_post if kind == "post" else forward_pre


def _load_saes(vllm_config: Any) -> list[LoadedSAE]:
    specs = getattr(vllm_config.model_config.hf_config, "saelora_saes", None) or []
    device = str(vllm_config.device_config.device)
    saes = []
    for s in specs:
        sae, source = read_sae(s["path"], device=device)  # fp32, whatever the model dtype
        if s.get("folded_scale"):
            sae.fold_activation_norm_scaling_factor(float(s["folded_scale"]))
        pack_sae_encoder(sae)  # a TopK encoder's matmul on a prepacked oneDNN copy, as the torch engine's
        saes.append(LoadedSAE(name=s["name"], sae=sae, hook=HookPoint(int(s["layer"]), s["kind"]), source=source,
                              fingerprint={}, policy=PositionPolicy.from_json(s.get("policy") or {}),
                              center=bool(s.get("center")), folded_scale=s.get("folded_scale")))
    return saes


class _SpliceMixin:
    """Loads the SAEs named in the config and wraps the decoder layers at their hooks."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        saes = _load_saes(vllm_config)
        self.saelora = SpliceRuntime(saes)  # a plain object: not a submodule, invisible to weights and LoRA
        layers = self.model.layers  # type: ignore[attr-defined]
        for s in saes:
            _wrap_layer(layers[s.hook.layer], self.saelora, s.name, s.hook.kind)
        log.info("spliced %d SAE(s) into %s: %s", len(saes), type(self).__name__,
                 ", ".join(f"{s.name}@{s.hook.name}" for s in saes))

    def forward(self, input_ids: torch.Tensor | None, *args: Any, **kwargs: Any) -> Any:
        """Hands the runtime each forward's flat input_ids (for the position policy). This forward is outside
        the compiled backbone, so it runs on every step (inside it, a trace-once compile would freeze it)."""
        self.saelora.ids = input_ids
        return super().forward(input_ids, *args, **kwargs)  # type: ignore[misc]


def _spliced_class(arch: str) -> type:
    """`Saelora<arch>`: vLLM's own class for `arch` with the splice mixed in."""
    base = getattr(importlib.import_module(f"vllm.model_executor.models.{ARCHITECTURES[arch]}"), arch)
    return type(spliced_architecture(arch), (_SpliceMixin, base), {"__module__": __name__})


# generated from the architecture list (compat.py); vLLM's registry finds them here by name
globals().update({spliced_architecture(a): _spliced_class(a) for a in ARCHITECTURES})
