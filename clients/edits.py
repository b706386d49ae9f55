"""Builders for the `sae` extension's edits: latent edits (`Edit`) and steering vectors (`Vector`)."""

from __future__ import annotations

from typing import Any, Sequence

from . import protocol as P


class Edit:
    """Latent edits for the `sae.edits` field: Edit.set(f, v), Edit.add, Edit.scale, Edit.clamp_max,
    Edit.clamp_min, Edit.ablate(f)."""

    @staticmethod
    def make(op: str, feature: int, value: float = 0.0, sae: str | None = None,
             positions: str | list[int] = "all", when: P.SAECondition | None = None, unit: str = "raw") -> P.SAEEdit:
        """unit: raw, max (multiples of the latent's max activation) or norm (fractions of the residual norm)."""
        return P.SAEEdit(sae=sae, feature=feature, op=op, value=value, positions=positions,  # type: ignore[arg-type]
                         when=when, unit=unit)  # type: ignore[arg-type]

    @staticmethod
    def when(feature: int, above: float, sae: str | None = None) -> P.SAECondition:
        """A condition: latent `feature` (before edits) above `above`; for `when=` of an edit, or `stop_when`."""
        return P.SAECondition(sae=sae, feature=feature, above=above)

    @staticmethod
    def set(feature: int, value: float, **kw: Any) -> P.SAEEdit:
        return Edit.make("set", feature, value, **kw)

    @staticmethod
    def add(feature: int, value: float, **kw: Any) -> P.SAEEdit:
        return Edit.make("add", feature, value, **kw)

    @staticmethod
    def scale(feature: int, value: float, **kw: Any) -> P.SAEEdit:
        return Edit.make("scale", feature, value, **kw)

    @staticmethod
    def clamp_max(feature: int, value: float, **kw: Any) -> P.SAEEdit:
        return Edit.make("clamp_max", feature, value, **kw)

    @staticmethod
    def clamp_min(feature: int, value: float, **kw: Any) -> P.SAEEdit:
        return Edit.make("clamp_min", feature, value, **kw)

    @staticmethod
    def ablate(feature: int, **kw: Any) -> P.SAEEdit:
        return Edit.make("ablate", feature, 0.0, **kw)


class Vector:
    """Steering-vector edits for `sae.vectors`: Vector.add(name_or_values, value, unit="norm") and
    Vector.project(name_or_values, value) (the paper's projection scaling)."""

    @staticmethod
    def make(op: str, vector: str | Sequence[float], value: float = 1.0, unit: str = "raw", sae: str | None = None,
             positions: str | list[int] = "all", when: P.SAECondition | None = None) -> P.SAEVectorEdit:
        kw: dict[str, Any] = dict(sae=sae, op=op, value=value, unit=unit, positions=positions, when=when)
        if isinstance(vector, str):  # SAEVectorEdit is a union: build the member the arguments name
            return P.SAEVectorByName(vector=vector, **kw)
        return P.SAEVectorValues(values=list(vector), **kw)

    @staticmethod
    def add(vector: str | Sequence[float], value: float = 1.0, **kw: Any) -> P.SAEVectorEdit:
        return Vector.make("add", vector, value, **kw)

    @staticmethod
    def project(vector: str | Sequence[float], value: float, **kw: Any) -> P.SAEVectorEdit:
        return Vector.make("project", vector, value, **kw)
