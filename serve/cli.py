"""`saelora serve`: the OpenAI-compatible server over the torch engine (default) or the vLLM engine."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from saelora.adapters.config import DEFAULT_MODEL

log = logging.getLogger(__name__)


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from saelora.adapters.bundle import has_manifest
    from saelora.adapters.config import demo_dir
    from saelora.adapters.models import load_model
    from saelora.adapters.saes import load_sae
    from saelora.adapters.threads import one_thread

    from .api.app import create_app

    if args.no_sae and args.sae:
        raise SystemExit("--no-sae and --sae exclude each other")
    saes_specs, adapters = list(args.sae or []), list(args.adapter or [])
    demo = demo_dir(args.model)
    if not saes_specs and not args.no_sae and (demo / "sae" / "cfg.json").is_file():
        saes_specs = [str(demo / "sae")]
        log.info("no --sae given: using the demo SAE %s", saes_specs[0])
        if not adapters and has_manifest(demo / "adapter"):
            adapters = [f"demo={demo / 'adapter'}"]
    with one_thread():  # start-up starts no OpenMP team on this thread: the engine thread's stays the only one
        # vLLM loads the weights itself: saelora keeps a meta-device skeleton (config, module names, fingerprint)
        # and only the final norm and unembedding, on the CPU (the logit lens), never a second copy on the GPU.
        lm = load_model(args.model, device=args.device, weights=args.engine != "vllm")
        saes = [load_sae(lm.model, s, tokenizer=lm.tokenizer, policy=args.policy) for s in saes_specs]
        engine = _make_engine(args, lm, saes)
        for spec in adapters:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise SystemExit(f"--adapter takes NAME=PATH, got {spec!r}")
            engine.load_adapter_now(name, path)
    loopback = args.host in ("127.0.0.1", "localhost", "::1")
    app = create_app(engine, served_name=args.served_model_name or lm.spec, api_key=args.api_key,
                     admin_api_key=args.admin_api_key, presets_dir=args.presets,
                     allowed_hosts=["127.0.0.1", "localhost", "[::1]", "::1"] if loopback else None)
    log.info("serving %s (%s engine) with %d SAE(s) and %d adapter(s) on http://%s:%d", lm.spec, args.engine,
             len(saes), len(adapters), args.host, args.port)
    _draining_server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                    timeout_graceful_shutdown=args.shutdown_grace)).run()
    return 0


def _draining_server(config: Any) -> Any:
    """uvicorn's server, which on SIGTERM/SIGINT first puts the app in draining mode (new requests: 503 with
    Retry-After), then lets in-flight requests finish for up to --shutdown-grace seconds and stops the engine."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            config.app.state.saelora.drain()
            log.info("shutting down: new requests get 503; in-flight ones get %s s", config.timeout_graceful_shutdown)
            super().handle_exit(sig, frame)

    return DrainingServer(config)


def _make_engine(args: argparse.Namespace, lm, saes):  # noqa: ANN001, ANN202
    if args.engine == "vllm":
        from saelora.adapters.errors import ConfigError

        try:
            from .vllm_engine.engine import VllmEngine, VllmOptions
        except ImportError as e:
            raise ConfigError(f"--engine vllm needs vLLM: pip install 'saelora[vllm]' ({e})") from e
        return VllmEngine(lm, saes, VllmOptions(
            max_batch=args.max_batch, max_queue=args.max_queue, max_model_len=args.max_model_len,
            kv_cache_gb=args.kv_cache_gb, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
            prefix_caching=not args.no_prefix_caching, adapter_root=args.adapter_root,
            tensor_parallel_size=args.tensor_parallel_size))
    from .torch_engine import TorchEngine

    return TorchEngine(lm, saes, max_batch=args.max_batch, max_queue=args.max_queue,
                       max_model_len=args.max_model_len, adapter_root=args.adapter_root,
                       pack_weights=not args.no_pack_weights)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible server with SAE latents, steering and adapter hot-swap",
                       description="Serve a base model with its SAE(s) and LoRA adapters over HTTP.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"base model spec (default: the embedded {DEFAULT_MODEL}; "
                   "also gemma3-270m)")
    p.add_argument("--sae", action="append", help="sae-lens folder to splice (repeatable; default: the demo SAE "
                   "from `make demo` when present)")
    p.add_argument("--no-sae", action="store_true", help="serve the plain model: no SAE, not even the demo's")
    p.add_argument("--policy", help="position-policy override for every SAE, e.g. keep_first=0,keep_ids= (default: "
                   "each SAE's recorded policy, else the paper's: BOS/EOS and a BOS-less position 0 stay original)")
    p.add_argument("--adapter", action="append", help="NAME=PATH of an adapter bundle to load at start (repeatable)")
    p.add_argument("--adapter-root", help="folder from which adapters may be loaded at runtime "
                   "(POST /v1/load_lora_adapter); runtime loading is off without it")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health")
    p.add_argument("--admin-api-key", help="key for adapter load/unload and steering-preset changes (with --api-key "
                   "alone they are refused)")
    p.add_argument("--presets", help="folder of steering presets (one JSON file each, PUT /v1/steering/presets/NAME "
                   "writes there; default: kept in memory only)")
    p.add_argument("--served-model-name", help="model id clients use (default: the model spec)")
    p.add_argument("--max-batch", type=int, default=8, help="rows decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429 (default 64)")
    p.add_argument("--max-model-len", type=int, help="context window: prompt + max_tokens (default: the model's)")
    p.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds in-flight requests get to finish "
                   "after SIGTERM; new requests get 503 meanwhile (default 30)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--engine", choices=("torch", "vllm"), default="torch",
                   help="torch: the embedded transformers + PEFT engine (default); vllm: vLLM with the SAE splice "
                   "and native multi-LoRA (needs saelora[vllm]; llama/mistral/qwen2/qwen3/gemma/gemma2)")
    p.add_argument("--no-pack-weights", action="store_true", help="torch engine on CPU: run linear layers (and "
                   "TopK SAE encoders) with F.linear / sae-lens on their own weights, not on prepacked oneDNN "
                   "copies (those are ~2x faster per decode step and cost one more copy of the weights in memory)")
    g = p.add_argument_group("vLLM engine")
    g.add_argument("--kv-cache-gb", type=float, default=2.0, help="KV cache size in GiB (default 2)")
    g.add_argument("--max-loras", type=int, default=4, help="adapters resident at once; 0 turns LoRA off "
                   "(default 4)")
    g.add_argument("--max-lora-rank", type=int, default=64, help="largest adapter rank accepted (default 64)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="GPUs (or CPU core groups) the model is split over, as vLLM's option; the splice runs on "
                   "the replicated residual stream and latents come back once (default 1; docs/scaling.md)")
    g.add_argument("--no-prefix-caching", action="store_true", help="turn vLLM's prefix caching off (it is on, "
                   "with a cache_salt policy that keeps latents and edits correct; see docs/vllm.md)")
    p.set_defaults(func=_cmd_serve)
