"""`saelora serve`: the OpenAI-compatible server over the torch engine (default) or the vLLM engine."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from .config import ServeConfig

log = logging.getLogger(__name__)


def _cmd_serve(args: argparse.Namespace) -> int:
    from saelora.adapters.options import config_from_args

    return serve(config_from_args(ServeConfig, args))


def serve(cfg: ServeConfig) -> int:
    """Load the model, SAEs and adapters `cfg` names and serve them until SIGTERM/SIGINT."""
    import uvicorn

    from saelora.adapters.bundle import has_manifest
    from saelora.adapters.config import demo_dir
    from saelora.adapters.models import load_model
    from saelora.adapters.saes import load_sae
    from saelora.adapters.threads import one_thread

    from .api.app import create_app
    from .keys import is_loopback, resolve

    if cfg.no_sae and cfg.sae:
        raise SystemExit("--no-sae and --sae exclude each other")
    keys = resolve(cfg.host, cfg.api_key, cfg.api_key_file, cfg.admin_api_key, cfg.admin_api_key_file,
                   cfg.allow_unauthenticated)  # before anything loads: a refusal costs nothing
    saes_specs, adapters = list(cfg.sae or []), list(cfg.adapter or [])
    demo = demo_dir(cfg.model)
    if not saes_specs and not cfg.no_sae and (demo / "sae" / "cfg.json").is_file():
        saes_specs = [str(demo / "sae")]
        log.info("no --sae given: using the demo SAE %s", saes_specs[0])
        if not adapters and has_manifest(demo / "adapter"):
            adapters = [f"demo={demo / 'adapter'}"]
    with one_thread():  # start-up starts no OpenMP team on this thread: the engine thread's stays the only one
        # vLLM loads the weights itself: saelora keeps a meta-device skeleton (config, module names, fingerprint)
        # and only the final norm and unembedding, on the CPU (the logit lens), never a second copy on the GPU.
        lm = load_model(cfg.model, device=cfg.device, weights=cfg.engine != "vllm")
        saes = [load_sae(lm.model, s, tokenizer=lm.tokenizer, policy=cfg.policy) for s in saes_specs]
        engine = _make_engine(cfg, lm, saes)
        for spec in adapters:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise SystemExit(f"--adapter takes NAME=PATH, got {spec!r}")
            engine.load_adapter_now(name, path)
    app = create_app(engine, served_name=cfg.served_model_name or lm.spec, api_key=keys.api_key,
                     admin_api_key=keys.admin_api_key, presets_dir=cfg.presets, allow_origins=cfg.allow_origin,
                     allowed_hosts=["127.0.0.1", "localhost", "[::1]", "::1"] if is_loopback(cfg.host) else None)
    log.info("serving %s (%s engine) with %d SAE(s) and %d adapter(s) on http://%s:%d", lm.spec, cfg.engine,
             len(saes), len(adapters), cfg.host, cfg.port)
    _draining_server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning",
                                    timeout_graceful_shutdown=cfg.shutdown_grace)).run()
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


def _make_engine(cfg: ServeConfig, lm: Any, saes: list[Any]) -> Any:
    if cfg.engine == "vllm":
        from saelora.adapters.errors import ConfigError

        try:
            from .vllm_engine.engine import VllmEngine
        except ImportError as e:
            raise ConfigError(f"--engine vllm needs vLLM: pip install 'saelora[vllm]' ({e})") from e
        return VllmEngine(lm, saes, cfg)
    from .torch_engine import TorchEngine

    return TorchEngine(lm, saes, max_batch=cfg.max_batch, max_queue=cfg.max_queue, max_model_len=cfg.max_model_len,
                       adapter_root=cfg.adapter_root, pack_weights=cfg.pack_weights, max_adapters=cfg.max_adapters,
                       max_num_batched_tokens=cfg.max_num_batched_tokens, request_timeout=cfg.request_timeout)


def register(sub: argparse._SubParsersAction) -> None:
    from saelora.adapters.options import add_dataclass_args

    from .config import ServeConfig

    p = sub.add_parser("serve", help="OpenAI-compatible server with SAE latents, steering and adapter hot-swap",
                       description="Serve a base model with its SAE(s) and LoRA adapters over HTTP. Every option is a "
                       "field of ServeConfig (serve/config.py).")
    add_dataclass_args(p, ServeConfig)
    p.set_defaults(func=_cmd_serve)
