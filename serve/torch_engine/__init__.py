"""saelora.serve.torch_engine: the embedded engine (transformers + PEFT + the splice hooks) with step-level
continuous batching (engine.py) and per-row KV caches (kv.py)."""

from .engine import TorchEngine

__all__ = ["TorchEngine"]
