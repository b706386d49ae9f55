"""Prometheus metrics of one server (a registry per app, so tests can run several servers)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..core.engine import Engine


class Metrics:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.registry = r = CollectorRegistry()
        self.requests = Counter("saelora_requests", "HTTP requests", ["route", "status"], registry=r)
        self.latency = Histogram("saelora_request_latency_seconds", "request latency", ["route"], registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.prompt_tokens = Counter("saelora_prompt_tokens", "prompt tokens processed", registry=r)
        self.generated_tokens = Counter("saelora_generated_tokens", "tokens generated", registry=r)
        self.running = Gauge("saelora_batch_size", "rows in the running batch", registry=r)
        self.queued = Gauge("saelora_queue_depth", "requests waiting for a batch slot", registry=r)
        self.adapters = Gauge("saelora_adapters_loaded", "adapters loaded", registry=r)
        self.cached = Gauge("saelora_prefix_cached_tokens", "prompt tokens taken from the prefix cache, total "
                            "(vLLM engine)", registry=r)

    def count_tokens(self, prompt: int, generated: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.generated_tokens.inc(generated)

    def render(self) -> bytes:
        s = self.engine.stats()
        self.running.set(s.get("running", 0))
        self.queued.set(s.get("queued", 0))
        self.adapters.set(s.get("adapters", 0))
        self.cached.set(s.get("prefix_cached_tokens", 0))
        return generate_latest(self.registry)
