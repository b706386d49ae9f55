"""The vLLM engine: SAE splice, latent edits, per-token latents and multi-LoRA inside vLLM (see docs/vllm.md).

`register` is the `vllm.general_plugins` entry point: it tells vLLM's model registry about the spliced
model classes (lazily, by "module:Class", so importing saelora never imports vLLM). It is re-entrant.
"""

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                 "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")


def spliced_architecture(arch: str) -> str:
    """The registered spliced class name for a base architecture, e.g. Saelora + LlamaForCausalLM."""
    return "Saelora" + arch


def register() -> None:
    """Register the spliced model classes; on CPU also install the grouped LoRA ops (lora_ops.py), which fix
    base rows picking up an adapter when every LoRA slot is in use (SAELORA_VLLM_LORA_OPS=vllm keeps vLLM's),
    and the eager logprob-rank op (sampler_ops.py), which keeps a first logprobs request from compiling."""
    import os

    from vllm import ModelRegistry

    for arch in ARCHITECTURES:
        name = spliced_architecture(arch)
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"saelora.serve.vllm_engine.model:{name}")
    if os.environ.get("SAELORA_VLLM_LORA_OPS", "grouped") != "vllm":
        from .lora_ops import install

        install()
    from . import sampler_ops

    sampler_ops.install()
