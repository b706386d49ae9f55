"""Experiment tracking: `--report-to none|tensorboard|trackio` (the Hugging Face Trainer's convention).

Every row the loop appends to metrics.jsonl is also handed to the tracker, flattened into scalars with the same
numbers: a training row's `kl` becomes `train/kl`, an eval row's `eval.ce_adapted` becomes `eval/ce_adapted`, at
the row's `step`. Nothing is sent anywhere: TensorBoard writes event files to `<out>/tensorboard`, trackio its
local database to `<out>/trackio` (unless $TRACKIO_DIR says otherwise). Both libraries are optional: asking for
one that is not installed is a clear error before training starts.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

from saelora.adapters.errors import ConfigError

ReportTo = Literal["none", "tensorboard", "trackio"]
REPORT_TO: tuple[str, ...] = get_args(ReportTo)
_MODULE = {"tensorboard": "tensorboard", "trackio": "trackio"}


class Tracker(Protocol):
    def log(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row as the tracker's scalars: numbers only, nested keys joined, `train/` or `eval/`."""
    if "eval" in row:
        return {f"eval/{k}": float(v) for k, v in row["eval"].items() if is_number(v)}
    return {f"train/{k}": float(v) for k, v in row.items() if k != "step" and is_number(v)}


def is_number(v: Any) -> bool:
    """A value a tracker logs as a scalar (bools are not)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Null:
    def log(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class _TensorBoard:
    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(str(out / "tensorboard"))
        self.w.add_text("config", "\n".join(f"    {k}: {v}" for k, v in sorted(config.items())))

    def log(self, row: dict[str, Any]) -> None:
        for k, v in scalars(row).items():
            self.w.add_scalar(k, v, global_step=int(row["step"]))

    def close(self) -> None:
        self.w.close()


class _Trackio:
    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        os.environ.setdefault("TRACKIO_DIR", str(out / "trackio"))  # read when trackio is imported
        import trackio

        self.t = trackio
        self.run = trackio.init(project="saelora", name=out.name, config=config, embed=False)

    def log(self, row: dict[str, Any]) -> None:
        self.t.log(scalars(row), step=int(row["step"]))

    def close(self) -> None:
        self.t.finish()


def check(report_to: str) -> None:
    """Before any work: the value is known and its library importable."""
    if report_to not in REPORT_TO:
        raise ConfigError(f"--report-to {report_to!r}: one of {', '.join(REPORT_TO)}")
    if report_to != "none" and importlib.util.find_spec(_MODULE[report_to]) is None:
        raise ConfigError(f"--report-to {report_to} needs the {report_to} package: pip install {report_to}")


def make_tracker(report_to: str, out: Path, config: dict[str, Any], is_main: bool = True) -> Tracker:
    """The tracker for this process (data parallel: rank 0 only, as metrics.jsonl)."""
    check(report_to)
    if report_to == "none" or not is_main:
        return _Null()
    return _TensorBoard(out, config) if report_to == "tensorboard" else _Trackio(out, config)
