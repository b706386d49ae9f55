"""LoRA target names: the paper's short names and the module-name suffixes they mean per architecture family.

One home for the vocabulary the trainer (which modules get LoRA) and the vLLM engine (which modules it can
serve LoRA on) share.
"""

from __future__ import annotations

from typing import Literal, get_args

TargetName = Literal["q", "k", "v", "o", "gate", "up", "down"]
TARGET_NAMES: tuple[str, ...] = get_args(TargetName)

# Short name -> module-name suffix, per family. gpt2 fuses q,k,v into attn.c_attn and has no gate.
TARGET_MODULES: dict[str, dict[str, str]] = {
    "llama": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
              "gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    "gpt2": {"q": "attn.c_attn", "k": "attn.c_attn", "v": "attn.c_attn", "o": "attn.c_proj",
             "up": "mlp.c_fc", "down": "mlp.c_proj"},
}
# transformers `model_type` -> family.
FAMILY: dict[str, str] = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma": "llama",
                          "gemma2": "llama", "gemma3_text": "llama", "phi3": "llama", "olmo2": "llama", "gpt2": "gpt2"}
# The module names of the llama-style families (what vLLM's LoRA layers are built for).
LLAMA_MODULES: tuple[str, ...] = tuple(TARGET_MODULES["llama"][t] for t in TARGET_NAMES)


def target_table(model_type: str) -> dict[str, str]:
    """Short name -> module suffix for a transformers `model_type` (llama-style when unknown)."""
    return TARGET_MODULES[FAMILY.get(model_type, "llama")]
