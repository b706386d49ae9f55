"""The steering vocabulary, in one place: splice modes, edit ops and positions, the latent edit, its checks, the op
table and the edit's JSON form. The HTTP protocol (clients/protocol.py), the splice, both engines and the
trainer take these words from here and never retype them.

This module imports no torch (the client imports it); the op table and the position mask act on tensors
through their methods only.

    replace     the residual stream <- the SAE's reconstruction (the paper's training setting)
    error_term  reconstruction of the edited latents + the SAE's error: without edits, exactly the base model
    off         the stream is untouched (latents can still be read)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, get_args

from .errors import SaeloraError

Mode = Literal["replace", "error_term", "off"]
Op = Literal["set", "add", "scale", "clamp_max", "clamp_min", "ablate"]
#: A steering vector's ops at an SAE's hook: `add` (x += value * v) and the paper's projection scaling
#: `project` (x += value * (x . v^) v^, v^ = v / |v|).
VectorOp = Literal["add", "project"]
PositionWord = Literal["all", "prompt", "generated"]
#: The unit of an edit's value. raw: as given; max: a multiple of the latent's max activation on the description
#: corpus; norm: a fraction of the typical residual norm at the hook, along the decoder direction (or the vector).
#: Converted to raw at the HTTP edge (adapters/steering.py `to_raw`); engines see raw values only.
Unit = Literal["raw", "max", "norm"]
VectorUnit = Literal["raw", "norm"]  # a vector has no max activation
MODES: tuple[str, ...] = get_args(Mode)
OPS: tuple[str, ...] = get_args(Op)
VECTOR_OPS: tuple[str, ...] = get_args(VectorOp)
POSITION_WORDS: tuple[str, ...] = get_args(PositionWord)
UNITS: tuple[str, ...] = get_args(Unit)

#: Serving's default mode: no edit means the exact base model. Training splices in `replace` (TRAIN_MODE).
SERVE_MODE: Mode = "error_term"
TRAIN_MODE: Mode = "replace"
#: Largest |value| an edit may carry: latents here reach ~10^4, and a value past ~10^38 is no fp32 number.
MAX_EDIT_VALUE = 1e6


class SpliceError(SaeloraError, ValueError):
    """Invalid splice configuration or edit (unknown SAE, feature out of range, bad op/value/positions)."""


class SpliceNotFoundError(SpliceError):
    """The edit names an SAE that is not spliced, or a latent the SAE does not have (the server answers 404)."""


@dataclass(frozen=True)
class Condition:
    """Latent `feature` of SAE `sae`, before any edit, is above `above` at a token. Gates an edit (`when`) or
    ends a generation (`stop_when`)."""

    sae: str
    feature: int
    above: float

    def to_json(self) -> list[Any]:
        return [self.sae, self.feature, self.above]

    @classmethod
    def from_json(cls, data: list[Any]) -> "Condition":
        sae, feature, above = data
        return cls(sae, int(feature), float(above))


@dataclass(frozen=True)
class LatentEdit:
    """Change latent `feature` of SAE `sae`: set|add|scale|clamp_max|clamp_min|ablate by `value` at `positions`,
    and, with `when`, only at the tokens where that condition holds (on the SAE's own, unedited latents).

    positions: "all", "prompt" (position < prompt_len), "generated" (position >= prompt_len),
    or a tuple of absolute token positions (0 = first token of the row).
    """

    sae: str
    feature: int
    op: str
    value: float = 0.0
    positions: str | tuple[int, ...] = "all"
    when: Condition | None = None

    def to_json(self) -> list[Any]:
        """Plain JSON types: [sae, feature, op, value, positions, when] (crosses process boundaries)."""
        return [self.sae, self.feature, self.op, self.value,
                self.positions if isinstance(self.positions, str) else list(self.positions),
                self.when.to_json() if self.when else None]

    @classmethod
    def from_json(cls, data: list[Any]) -> "LatentEdit":
        sae, feature, op, value, positions, when = data
        return cls(sae, int(feature), op, float(value),
                   positions if isinstance(positions, str) else tuple(int(p) for p in positions),
                   Condition.from_json(when) if when else None)


@dataclass(frozen=True)
class VectorEdit:
    """Steer along a direction of the residual stream at SAE `sae`'s hook point, independent of its latents:
    op `add` (x += value * vector) or `project` (x += value * (x . v^) v^), at `positions`, with `when` only at the
    tokens where that latent of the SAE (before any edit) is above a threshold. Applied after the SAE's splice, in
    every splice mode; positions the SAE's policy keeps original stay original."""

    sae: str
    vector: tuple[float, ...]
    op: str = "add"
    value: float = 1.0
    positions: str | tuple[int, ...] = "all"
    when: Condition | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types (a dict, where a latent edit is a list)."""
        return {"sae": self.sae, "vector": list(self.vector), "op": self.op, "value": self.value,
                "positions": self.positions if isinstance(self.positions, str) else list(self.positions),
                "when": self.when.to_json() if self.when else None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "VectorEdit":
        pos = data["positions"]
        return cls(data["sae"], tuple(float(v) for v in data["vector"]), data["op"], float(data["value"]),
                   pos if isinstance(pos, str) else tuple(int(p) for p in pos),
                   Condition.from_json(data["when"]) if data.get("when") else None)


Edit = LatentEdit | VectorEdit


def edit_from_json(data: list[Any] | dict[str, Any]) -> Edit:
    """An edit from its JSON form (`to_json`): a list is a latent edit, a dict a vector edit."""
    return VectorEdit.from_json(data) if isinstance(data, dict) else LatentEdit.from_json(data)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise SpliceError(f"Unknown splice mode {mode!r}; expected one of {MODES}")


def check_condition(c: Condition, d_sae: int) -> None:
    """Raise `SpliceError` unless `c` can be read from its SAE, which has `d_sae` latents."""
    if isinstance(c.feature, bool) or not isinstance(c.feature, int) or not 0 <= c.feature < d_sae:
        raise SpliceNotFoundError(f"Condition feature {c.feature!r} of SAE {c.sae!r} is outside [0, {d_sae})")
    if not isinstance(c.above, (int, float)) or not math.isfinite(c.above) or abs(c.above) > MAX_EDIT_VALUE:
        raise SpliceError(f"A condition's threshold must be finite within ±{MAX_EDIT_VALUE:g}, got {c.above!r}")


def check_edit(e: Edit, d_sae: int, d_in: int | None = None) -> None:
    """Raise `SpliceError` unless `e` can be applied to an SAE with `d_sae` latents (and, for a vector edit, a
    residual stream of width `d_in`, when known)."""
    if isinstance(e, VectorEdit):
        _check_vector(e, d_in)
    else:
        if e.op not in OPS:
            raise SpliceError(f"Unknown edit op {e.op!r}; expected one of {OPS}")
        if isinstance(e.feature, bool) or not isinstance(e.feature, int) or not 0 <= e.feature < d_sae:
            raise SpliceNotFoundError(f"Feature index {e.feature!r} of SAE {e.sae!r} is outside [0, {d_sae})")
    if not isinstance(e.value, (int, float)) or not math.isfinite(e.value):
        raise SpliceError(f"Edit value must be a finite number, got {e.value!r}")
    if abs(e.value) > MAX_EDIT_VALUE:
        raise SpliceError(f"Edit value {e.value!r} is outside [-{MAX_EDIT_VALUE:g}, {MAX_EDIT_VALUE:g}]")
    if isinstance(e.positions, str):
        if e.positions not in POSITION_WORDS:
            raise SpliceError(f"positions must be one of {POSITION_WORDS} or a list of ints, got {e.positions!r}")
    elif not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in e.positions):
        raise SpliceError(f"positions must be non-negative ints, got {list(e.positions)!r}")
    if e.when is not None:
        if e.when.sae != e.sae:
            raise SpliceError(f"an edit's condition reads the edit's own SAE ({e.sae!r}), not {e.when.sae!r}: "
                              "latents of another SAE are not known where this one is spliced")
        check_condition(e.when, d_sae)


def _check_vector(e: VectorEdit, d_in: int | None) -> None:
    """A vector of another width is a direction the SAE's hook does not have: not found (404), as a latent
    outside [0, d_sae) is. An all-zero vector is allowed and does nothing."""
    if e.op not in VECTOR_OPS:
        raise SpliceError(f"Unknown vector op {e.op!r}; expected one of {VECTOR_OPS}")
    if d_in is not None and len(e.vector) != d_in:
        raise SpliceNotFoundError(f"SAE {e.sae!r} acts on a residual of {d_in} numbers; the vector has "
                                  f"{len(e.vector)}")
    if not e.vector or not all(isinstance(v, (int, float)) and math.isfinite(v) and abs(v) <= MAX_EDIT_VALUE
                               for v in e.vector):
        raise SpliceError(f"A steering vector's numbers must be finite within ±{MAX_EDIT_VALUE:g}")


#: op -> f(latent column, value): the edited column (same shape).
OP_TABLE: dict[str, Callable[[Any, float], Any]] = {
    "set": lambda col, v: col.new_full(col.shape, v),
    "add": lambda col, v: col + v,
    "scale": lambda col, v: col * v,
    "clamp_max": lambda col, v: col.clamp(max=v),
    "clamp_min": lambda col, v: col.clamp(min=v),
    "ablate": lambda col, v: col.new_zeros(col.shape),
}
assert set(OP_TABLE) == set(OPS)


def apply_op(op: str, col: Any, value: float) -> Any:
    """The latent column `col` (a tensor) after edit op `op` with `value`."""
    return OP_TABLE[op](col, value)


def position_mask(positions: str | tuple[int, ...], pos: Any, prompt_len: int | None) -> Any:
    """Boolean mask over `pos` (a tensor of any shape; -1 = padding) of the tokens an edit's `positions` selects."""
    real = pos >= 0
    if positions == "all":
        return real
    if positions == "prompt":
        return real if prompt_len is None else real & (pos < prompt_len)
    if positions == "generated":
        return real & False if prompt_len is None else pos >= prompt_len
    wanted = pos.new_tensor(list(positions))
    return real & (pos[..., None] == wanted).any(-1) if len(wanted) else real & False


def changes_stream(mode: str, edits: list[Edit] | tuple[Edit, ...], sae: str) -> bool:
    """Whether a row with this mode and these edits has its residual stream changed at SAE `sae`: `replace`,
    `error_term` with an edit of that SAE, or a vector edit at it (any mode). Otherwise the stream is exactly the
    base model's."""
    mine = [e for e in edits if e.sae == sae]
    return (mode == "replace" or (mode == "error_term" and bool(mine))
            or any(isinstance(e, VectorEdit) for e in mine))
