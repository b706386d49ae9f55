"""The vLLM engine: SAE splice, latent edits, per-token latents and multi-LoRA inside vLLM (see docs/vllm.md).

Every vLLM internal it relies on is listed in compat.py, which checks them and installs saelora's model classes
and ops when the engine starts (never through a vLLM plugin entry point)."""

from .compat import ARCHITECTURES, spliced_architecture

__all__ = ["ARCHITECTURES", "spliced_architecture"]
