"""Calibrated steering strength: an edit's value in a unit (`edits.Unit`), converted to the raw value the splice
applies. One home for the rule: the HTTP edge converts with it before anything reaches an engine, and the steering
benchmark calls it too. This module imports no torch.

    raw    the value as given (latent units for latent edits, a multiplier of the vector for vector edits)
    max    value x the latent's max activation on the description corpus (`saelora features`)
    norm   value x the typical (median) residual norm at the hook, along the direction: for a latent, a change of
           the latent by value x norm / |W_dec[latent]|; for a vector, value x norm / |vector|, so that the added
           vector's length is that fraction of the norm

`norm` suits `add`. `project`'s value is a pure multiplier of the stream's own component along the vector: it is
the same number in every unit. A vector has no max activation, so `max` is for latents only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from .edits import UNITS, SpliceError, SpliceNotFoundError


class UnitError(SpliceError):
    """A unit that cannot be converted for this edit."""


class MissingScalesError(UnitError, SpliceNotFoundError):
    """The SAE has no descriptions with the units' scales (the server answers 404: they are not found)."""


@dataclass(frozen=True)
class SteerScales:
    """What the units are measured in, for one SAE: each latent's max activation and decoder-row norm, and the
    median residual norm at the hook (over the positions the SAE is spliced at)."""

    max_act: Sequence[float]
    dec_norm: Sequence[float]
    resid_norm: float

    @classmethod
    def from_descriptions(cls, data: dict[str, Any] | None, sae: str) -> "SteerScales":
        """From `saelora features`' features.json (its `max`, `dec_norm` and `resid_norm`)."""
        feats = (data or {}).get("features") or []
        if not feats or "resid_norm" not in data or "dec_norm" not in feats[0]:
            raise MissingScalesError(f"SAE {sae!r} has no feature descriptions with scales: units 'max' and 'norm' "
                                     "need `saelora features` (run again if its descriptions predate them); use 'raw'")
        return cls([float(f["max"]) for f in feats], [float(f["dec_norm"]) for f in feats], float(data["resid_norm"]))


def to_raw(value: float, unit: str, scales: SteerScales | None, feature: int | None = None,
           vector: Sequence[float] | None = None, op: str = "add") -> float:
    """The raw value of an edit given in `unit`: of latent `feature`, or of a vector edit (`vector`) with `op`."""
    if unit not in UNITS:
        raise UnitError(f"unknown unit {unit!r}; expected one of {UNITS}")
    if vector is not None and unit == "max":
        raise UnitError("a vector has no max activation: use unit 'raw' or 'norm'")
    if unit == "raw" or (vector is not None and op == "project"):
        return float(value)
    if scales is None:
        raise MissingScalesError(f"unit {unit!r} needs the SAE's feature descriptions (saelora features); "
                                 "use unit 'raw'")
    if vector is not None:
        length = math.sqrt(sum(v * v for v in vector))
        return float(value) * scales.resid_norm / length if length > 0 else 0.0
    assert feature is not None
    if unit == "max":
        return float(value) * scales.max_act[feature]
    return float(value) * scales.resid_norm / max(scales.dec_norm[feature], 1e-12)
