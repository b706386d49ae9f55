"""`saelora serve`: the OpenAI-compatible server over the embedded torch engine."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def demo_dir() -> Path:
    """Where `make demo` keeps the default SAE and adapter ($SAELORA_CACHE/demo)."""
    from saelora.adapters.config import cache_dir

    return cache_dir() / "demo"


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from saelora.adapters.models import load_model
    from saelora.adapters.saes import load_sae

    from .app import create_app
    from .torch_engine import TorchEngine

    saes_specs, adapters = list(args.sae or []), list(args.adapter or [])
    if not saes_specs and (demo_dir() / "sae" / "cfg.json").is_file():
        saes_specs = [str(demo_dir() / "sae")]
        log.info("no --sae given: using the demo SAE %s", saes_specs[0])
        if not adapters and (demo_dir() / "adapter" / "saelora.json").is_file():
            adapters = [f"demo={demo_dir() / 'adapter'}"]
    lm = load_model(args.model, device=args.device)
    saes = [load_sae(lm.model, s) for s in saes_specs]
    engine = TorchEngine(lm, saes, max_batch=args.max_batch, max_queue=args.max_queue,
                         max_model_len=args.max_model_len, adapter_root=args.adapter_root)
    for spec in adapters:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--adapter takes NAME=PATH, got {spec!r}")
        engine.load_adapter_now(name, path)
    app = create_app(engine, served_name=args.served_model_name or lm.spec, api_key=args.api_key)
    log.info("serving %s with %d SAE(s) and %d adapter(s) on http://%s:%d", lm.spec, len(saes), len(adapters),
             args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible server with SAE latents, steering and adapter hot-swap",
                       description="Serve a base model with its SAE(s) and LoRA adapters over HTTP.")
    p.add_argument("--model", default="smollm2-135m", help="base model spec (default: the embedded smollm2-135m)")
    p.add_argument("--sae", action="append", help="sae-lens folder to splice (repeatable; default: the demo SAE "
                   "from `make demo` when present)")
    p.add_argument("--adapter", action="append", help="NAME=PATH of an adapter bundle to load at start (repeatable)")
    p.add_argument("--adapter-root", help="folder from which adapters may be loaded at runtime "
                   "(POST /v1/load_lora_adapter); runtime loading is off without it")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health")
    p.add_argument("--served-model-name", help="model id clients use (default: the model spec)")
    p.add_argument("--max-batch", type=int, default=8, help="rows decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429 (default 64)")
    p.add_argument("--max-model-len", type=int, help="context window: prompt + max_tokens (default: the model's)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.set_defaults(func=_cmd_serve)
