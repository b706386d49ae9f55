"""Subcommands of `saelora` that train and evaluate: train, train-e2e, train-sae, eval, features, steer-eval,
corpus-fetch, export.

Options are generated from the config dataclasses (adapters/options.py); each option's help is its field's metadata
(`opt(...)`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from typing import Any

from saelora.adapters.options import add_dataclass_args, config_from_args

from .config import opt

log = logging.getLogger(__name__)


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .train import train_lora

    bundle, final = train_lora(config_from_args(TrainConfig, args))
    _print_eval(final)
    print(f"adapter bundle: {bundle}")
    return 0


def _cmd_train_e2e(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .e2e import train_e2e

    folder, final = train_e2e(config_from_args(TrainConfig, args))
    _print_eval(final)
    print(f"fine-tuned SAEs: {folder}")
    return 0


def _cmd_train_sae(args: argparse.Namespace) -> int:
    from .train_sae import SAETrainConfig, train_sae

    folder, quality = train_sae(config_from_args(SAETrainConfig, args))
    print(json.dumps(quality, indent=2))
    print(f"SAE folder: {folder}")
    return 0


def _cmd_features(args: argparse.Namespace) -> int:
    from .features import FeaturesConfig, run_features

    for out in run_features(config_from_args(FeaturesConfig, args)):
        print(f"features: {out / 'features.json'}  page: {out / 'index.html'}")
    return 0


def _cmd_steer_eval(args: argparse.Namespace) -> int:
    from .run_steer_eval import run_steer_eval
    from .steer_eval import SteerEvalConfig
    from .steer_report import summarise, table

    result = run_steer_eval(config_from_args(SteerEvalConfig, args))
    for condition in sorted({r["condition"] for r in result["rows"]}):
        print(f"\n== {condition} (strengths chosen on the development concepts, reported on the others)")
        print(table(summarise(result["rows"], condition)))
    return 0


@dataclasses.dataclass
class CorpusFetchConfig:
    genres: list[str] = opt(factory=lambda: ["tech", "narrative"],
                            help="genres to fetch from Debian packages into $SAELORA_CACHE/corpus/genres "
                                 "(adapters/genres.py)")
    refresh: bool = opt(False, "download again the genres already fetched (default: keep them as they are)")


def _cmd_corpus_fetch(args: argparse.Namespace) -> int:
    from saelora.adapters.genres import fetch

    cfg = config_from_args(CorpusFetchConfig, args)
    manifest = fetch(tuple(cfg.genres), refresh=cfg.refresh)
    print(json.dumps({g: {k: v for k, v in m.items() if k != "packages"} for g, m in manifest.items()}, indent=1))
    return 0


def _print_eval(result: dict[str, Any]) -> None:
    from .evaluate import format_table

    print(format_table(result))


def _cmd_eval(args: argparse.Namespace) -> int:
    from .run_eval import EvalConfig, run_eval

    results = run_eval(config_from_args(EvalConfig, args))
    for name, res in results.items():
        print(f"\n== {name}")
        _print_eval(res)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import ExportConfig, export_merged

    print(export_merged(ExportConfig(merge=args.merge, out=args.out, model=args.model)))
    return 0


def _register_export(sub: argparse._SubParsersAction) -> None:
    from .export import ExportConfig

    text = "merge an adapter bundle into its base model: a plain HF checkpoint (the SAE splice is not in it)"
    p = sub.add_parser("export", help=text, description=text)
    help_of = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(ExportConfig)}
    p.add_argument("--merge", required=True, metavar="ADAPTER", help=help_of["merge"])
    p.add_argument("out", metavar="OUT", help=help_of["out"])
    p.add_argument("--model", help=help_of["model"])
    p.set_defaults(func=_cmd_export)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the trainer's subcommands to the `saelora` parser."""
    from .config import TrainConfig
    from .features import FeaturesConfig
    from .run_eval import EvalConfig
    from .steer_eval import SteerEvalConfig
    from .train_sae import SAETrainConfig

    specs = [
        ("train", TrainConfig, _cmd_train, "train a LoRA adapter around frozen SAEs (KL to the original model)"),
        ("train-e2e", TrainConfig, _cmd_train_e2e, "baseline: fine-tune the SAEs end to end with KL, model frozen"),
        ("train-sae", SAETrainConfig, _cmd_train_sae, "train an SAE on activations streamed from the model"),
        ("eval", EvalConfig, _cmd_eval, "CE base / spliced / spliced+adapter, gap closed, KL, L0, FVU"),
        ("features", FeaturesConfig, _cmd_features, "top-activating contexts per latent as JSON + HTML"),
        ("corpus-fetch", CorpusFetchConfig, _cmd_corpus_fetch, "fetch the broad corpus's genres beyond Wikipedia "
                                                                 "(technical prose, narrative) from Debian packages"),
        ("steer-eval", SteerEvalConfig, _cmd_steer_eval, "steering benchmark: concept score and fluency per method "
                                                         "and strength, auto-steer included"),
    ]
    for name, cls, func, text in specs:
        p = sub.add_parser(name, help=text, description=text)
        add_dataclass_args(p, cls, renames={"saes": "sae"})
        p.add_argument("--config", help="YAML or JSON file of these options (field or flag names; `lora:` may nest "
                       "the LoRA ones); flags given here override it")
        p.set_defaults(func=func, subparser=p)
    _register_export(sub)

