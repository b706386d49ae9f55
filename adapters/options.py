"""Configuration dataclasses as command lines: a field's help lives in its metadata (`opt`), and one --option per
field is generated from it (`add_dataclass_args`, `config_from_args`). The trainer's configs (`TrainConfig`, ...)
and the server's (`ServeConfig`) are written this way, so a default and its help have one home each.

Field metadata read here: `help`; `cli: False` (no option); `flag: True` (a bool given as a bare `--name`, for
options that were always spelled that way, e.g. `--no-sae`); `name` (the option's name when it is not the field's);
`aliases` (more flags, e.g. `-tp`, or the Hugging Face names `--learning-rate`); `deprecated` (old flags that still
work, with a warning); `split: False` (a repeatable option whose values are not comma-separated: paths). A
`Literal` field's values become the option's choices.

`read_config_file` turns a YAML or JSON file of the same fields into a parser's defaults (`--config`): the file
sets defaults and the command line overrides them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import types
import typing
from dataclasses import MISSING, field
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError

log = logging.getLogger(__name__)


def opt(default: Any = MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,  # noqa: A002
        **meta: Any) -> Any:
    """A config field with its command-line help (and any other option metadata above) in its metadata."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def _kind(hint: Any) -> Any:
    """bool, list, int, float or str: how a field of type `hint` is read from the command line (the first
    non-None member of a union: `str | list[int]` is given as a string, `int | None` as an int)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return list
    return hint if hint in (bool, int, float) else str


def _item_kind(hint: Any) -> Any:
    """int, float or str: how the items of a list field are read (`list[float]` items as floats)."""
    args = typing.get_args(hint)
    return args[0] if typing.get_origin(hint) is list and args and args[0] in (int, float) else str


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]


def add_dataclass_args(parser: argparse.ArgumentParser | Any, cls: type, renames: dict[str, str] | None = None,
                       prefix: str = "") -> None:
    """One --option per field of dataclass `cls` (lists repeatable or comma-separated; bools as --x/--no-x). A field
    that is itself a dataclass (`TrainConfig.lora`) contributes its own fields' options, unprefixed."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            add_dataclass_args(parser, hints[f.name], renames, prefix=f"{prefix}{f.name}.")
            continue
        name = (renames or {}).get(f.name) or f.metadata.get("name") or f.name
        flags = ["--" + name.replace("_", "-"), *f.metadata.get("aliases", ())]
        default = _default(f)
        text = f.metadata.get("help", "")
        if "(default:" not in text:  # a help that states its default in words keeps it, without "(default: None)"
            text = f"{text} (default: {default})".strip()
        text = text.replace("%", "%%")  # argparse formats help
        kind, dest = _kind(hints[f.name]), prefix + f.name
        if kind is bool:
            action = "store_true" if f.metadata.get("flag") else argparse.BooleanOptionalAction
            parser.add_argument(*flags, dest=dest, action=action, default=default, help=text)
        elif kind is list:
            parser.add_argument(*flags, dest=dest, action="append", default=None, help=text + "; repeatable")
        else:
            choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is typing.Literal else None
            parser.add_argument(*flags, dest=dest, type=kind, default=default, choices=choices, help=text)
        for old in f.metadata.get("deprecated", ()):
            parser.add_argument(old, dest=dest, type=kind if kind in (int, float, str) else str,
                                action=_deprecated(flags[0]), default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _deprecated(new: str) -> type[argparse.Action]:
    class Deprecated(argparse.Action):
        def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option: Any = None) -> None:
            log.warning("%s is deprecated: use %s", option, new)
            setattr(namespace, self.dest, values)
    return Deprecated


def read_config_file(path: str | Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """A YAML or JSON file of option values -> `parser`'s defaults, keyed by destination. Keys are field names
    or flag names (`lr`, `learning_rate`, `learning-rate`); a nested mapping (`lora: {rank: 8}`) is a nested
    config's fields. An unknown key is an error that names it."""
    text = Path(path).read_text() if Path(path).is_file() else None
    if text is None:
        raise ConfigError(f"--config {path}: no such file")
    try:
        import yaml

        data = yaml.safe_load(text) if Path(path).suffix in (".yaml", ".yml") else json.loads(text)
    except (ValueError, ImportError) as e:  # yaml's errors are ValueErrors too
        raise ConfigError(f"--config {path} cannot be read: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    names = {}
    for a in parser._actions:  # noqa: SLF001 - argparse has no public list of its options
        for n in (a.dest, *(o.lstrip("-") for o in a.option_strings)):
            names[n.replace("-", "_")] = a.dest
    out: dict[str, Any] = {}
    for key, value in _flat(data):
        dest = names.get(key.replace("-", "_")) or names.get(key.rsplit(".", 1)[-1].replace("-", "_"))
        if dest is None or dest in ("help", "config"):
            raise ConfigError(f"--config {path}: unknown option {key!r}")
        out[dest] = value
    return out


def _flat(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for k, v in data.items():
        items += _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]
    return items


def config_from_args(cls: type, args: argparse.Namespace, prefix: str = "") -> Any:
    """The dataclass `cls` from parsed options (nested dataclass fields built from their own options)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = config_from_args(hints[f.name], args, prefix=f"{prefix}{f.name}.")
            continue
        v = getattr(args, prefix + f.name)
        if isinstance(v, list):  # repeatable and/or comma-separated (unless `split: False`: paths)
            item = _item_kind(hints[f.name])
            v = [item(x) for y in v for x in (str(y).split(",") if f.metadata.get("split", True) else [y]) if x]
        if v is not None:
            values[f.name] = v
    return cls(**values)
