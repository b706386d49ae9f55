"""Steering at the HTTP edge: request edits and vectors to the engine's vocabulary (values in calibrated units
converted to raw here, adapters/units.py), named presets and steering vectors (kept as JSON files so they
survive restarts), the SAEs' feature descriptions, and the preset routes (the vector, search and auto-steer
routes are in steer_routes.py).

A request's edits are its preset's edits and vectors followed by its own; its mode is its own when it sets one,
else the preset's. Edits and conditions are checked against the loaded SAEs with the same checks the splice uses
(adapters/edits.py): an SAE or latent the server does not have is a 404, anything else out of bounds a 400.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Generic, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi import Path as FastAPIPath
from pydantic import BaseModel

from saelora.adapters.config import descriptions_file
from saelora.adapters.edits import Condition, Edit, LatentEdit, SpliceError, VectorEdit
from saelora.adapters.splice import RowSpec
from saelora.adapters.units import MissingScalesError, SteerScales, to_raw
from saelora.clients import protocol as P
from saelora.clients import protocol_steer as PS

from ..core.engine import Engine, EngineError, check_splice
from . import errors

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)


class NamedStore(Generic[M]):
    """Named records of one pydantic model, in memory and, with `folder`, one `<name>.json` file each (written
    atomically): steering presets and steering vectors."""

    def __init__(self, model: type[M], kind: str, limit: int, folder: str | Path | None = None) -> None:
        self.model, self.kind, self.limit = model, kind, limit
        self.folder = Path(folder) if folder else None
        self.items: dict[str, M] = {}
        self._lock = threading.Lock()
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            for f in sorted(self.folder.glob("*.json")):
                try:
                    self.items[f.stem] = model.model_validate_json(f.read_text())
                except ValueError as e:
                    log.warning("%s %s skipped: %s", kind, f, e)
            log.info("%d %s(s) from %s", len(self.items), kind, self.folder)

    def get(self, name: str) -> M:
        if name not in self.items:
            raise EngineError("not_found", f"no {self.kind} {name!r}", self.kind.split()[-1])
        return self.items[name]

    def put(self, name: str, item: M) -> bool:
        """Store (or replace) an item; returns whether it is new."""
        with self._lock:
            new = name not in self.items
            if new and len(self.items) >= self.limit:
                raise EngineError("conflict", f"at most {self.limit} {self.kind}s; delete one first", "name")
            if self.folder is not None:
                fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
                with os.fdopen(fd, "w") as f:
                    f.write(item.model_dump_json(indent=1))
                os.replace(tmp, self.folder / f"{name}.json")
            self.items[name] = item
            return new

    def delete(self, name: str) -> None:
        with self._lock:
            self.get(name)
            if self.folder is not None:
                (self.folder / f"{name}.json").unlink(missing_ok=True)
            del self.items[name]


def _sae_name(given: str | None, default: str | None, ids: list[str], param: str) -> str:
    if given is not None:
        return given
    if default is not None:
        return default
    if len(ids) != 1:
        raise EngineError("invalid", f"{param}.sae is required: several SAEs are loaded {ids}", f"{param}.sae")
    return ids[0]


def _positions(p: str | list[int]) -> str | tuple[int, ...]:
    return tuple(p) if isinstance(p, list) else p


class Steering:
    """The server's steering state over one engine: presets, vectors, descriptions (read once per SAE), and the
    conversion of a request's `sae` extension to checked engine edits."""

    def __init__(self, engine: Engine, presets_dir: str | None = None) -> None:
        self.engine = engine
        self.presets: NamedStore[P.SteeringPreset] = NamedStore(
            P.SteeringPreset, "steering preset", P.MAX_PRESETS, presets_dir)
        self.vectors: NamedStore[PS.StoredVector] = NamedStore(
            PS.StoredVector, "steering vector", P.MAX_PRESETS, Path(presets_dir) / "vectors" if presets_dir else None)
        self._descriptions: dict[str, dict[str, Any] | None] = {}
        self._scales: dict[str, SteerScales | None] = {}

    def sae(self, sae_id: str, param: str = "sae") -> dict[str, Any]:
        found = next((d for d in self.engine.saes() if d["name"] == sae_id), None)
        if found is None:
            raise EngineError("not_found", f"no SAE {sae_id!r}; see GET /v1/saes", param)
        return found

    def latent(self, sae_id: str, index: int) -> dict[str, Any]:
        """A URL's SAE (`sae_id`) after checking it has latent `index`: 404s otherwise."""
        sae = self.sae(sae_id, param="sae_id")
        if not 0 <= index < sae["d_sae"]:
            raise EngineError("not_found", f"no feature {index}: SAE {sae_id!r} has indices [0, {sae['d_sae']})",
                              "index")
        return sae

    def descriptions(self, sae_id: str) -> dict[str, Any] | None:
        """`saelora features`' features.json of an SAE, or None when it has none."""
        if sae_id not in self._descriptions:
            path = descriptions_file(self.sae(sae_id)["source"])
            self._descriptions[sae_id] = json.loads(path.read_text()) if path.is_file() else None
        return self._descriptions[sae_id]

    def scales(self, sae_id: str) -> SteerScales:
        """The units' scales of an SAE; `MissingScalesError` (404) when its descriptions lack them."""
        if sae_id not in self._scales:
            try:
                self._scales[sae_id] = SteerScales.from_descriptions(self.descriptions(sae_id), sae_id)
            except MissingScalesError:
                self._scales[sae_id] = None
        found = self._scales[sae_id]
        if found is None:
            raise MissingScalesError(f"SAE {sae_id!r} has no feature descriptions with scales: units 'max' and "
                                     "'norm' need `saelora features` for it (descriptions written before the units "
                                     "lack them); use 'raw'")
        return found

    def _value(self, value: float, unit: str, sae: str, param: str, **where: Any) -> float:
        try:
            try:  # most units need no scales (raw; project's multiplier): read the descriptions only when needed
                return to_raw(value, unit, None, **where)
            except MissingScalesError:
                return to_raw(value, unit, self.scales(sae), **where)
        except SpliceError as e:
            raise EngineError.from_splice(e, f"{param}.unit") from e

    def to_edits(self, edits: list[P.SAEEdit], ids: list[str], param: str) -> list[Edit]:
        out: list[Edit] = []
        for i, e in enumerate(edits):
            name = _sae_name(e.sae, None, ids, f"{param}.{i}")
            when = None
            if e.when is not None:
                when = Condition(_sae_name(e.when.sae, name, ids, f"{param}.{i}.when"), e.when.feature, e.when.above)
            if e.unit != "raw":
                self._latent_exists(name, e.feature, f"{param}.{i}")
            value = self._value(e.value, e.unit, name, f"{param}.{i}", feature=e.feature)
            out.append(LatentEdit(name, e.feature, e.op, value, _positions(e.positions), when))
        return out

    def _latent_exists(self, sae: str, feature: int, param: str) -> None:
        d_sae = int(self.sae(sae)["d_sae"])
        if not 0 <= feature < d_sae:
            raise EngineError("not_found", f"Feature index {feature} of SAE {sae!r} is outside [0, {d_sae})",
                              f"{param}.feature")

    def to_vectors(self, vectors: list[P.SAEVectorEdit], ids: list[str], param: str) -> list[Edit]:
        out: list[Edit] = []
        for i, v in enumerate(vectors):
            stored = self.vectors.get(v.vector) if isinstance(v, P.SAEVectorByName) else None
            name = _sae_name(v.sae, stored.sae if stored else None, ids, f"{param}.{i}")
            if stored is not None and stored.sae != name:  # not found at that SAE (a 404, as an unknown SAE is)
                raise EngineError("not_found", f"steering vector {v.vector!r} acts at SAE {stored.sae!r}, not at "
                                  f"{name!r}", f"{param}.{i}.sae")
            values = tuple(stored.values if stored is not None else v.values)  # type: ignore[union-attr]
            when = None
            if v.when is not None:
                when = Condition(_sae_name(v.when.sae, name, ids, f"{param}.{i}.when"), v.when.feature, v.when.above)
            value = self._value(v.value, v.unit, name, f"{param}.{i}", vector=values, op=v.op)
            out.append(VectorEdit(name, values, v.op, value, _positions(v.positions), when))
        return out

    def splice_request(self, sae: P.SAEOptions) -> RowSpec:
        """The engine's splice settings: the preset's edits and vectors, then the request's own; its stop
        conditions; all checked against the loaded SAEs."""
        saes = self.engine.saes()
        ids = [s["name"] for s in saes]
        if (sae.edits or sae.vectors or sae.mode != "off" or sae.features or sae.preset or sae.stop_when) and not ids:
            raise EngineError("invalid", "this server has no SAE loaded", "sae")
        preset = self.presets.get(sae.preset) if sae.preset else None
        edits = self.to_edits(preset.edits, ids, "preset.edits") + self.to_vectors(preset.vectors, ids,
                                                                                   "preset.vectors") if preset else []
        edits += self.to_edits(sae.edits, ids, "sae.edits") + self.to_vectors(sae.vectors, ids, "sae.vectors")
        stops = to_conditions(sae.stop_when, ids, "sae.stop_when")  # checked with the request, on admission
        f, mode = sae.features or P.SAEFeatureOptions(), sae.mode_or(preset.mode if preset else None)
        return RowSpec(modes={n: mode for n in ids}, edits=edits, stops=stops, top_k=f.top_k,
                       include_prompt=f.include_prompt, report=f.saes)

    def check_preset(self, body: P.SteeringPreset) -> None:
        """EngineError unless `body`'s edits and vectors fit the loaded SAEs (units converted as a request would)."""
        saes = self.engine.saes()
        if not saes:
            raise EngineError("invalid", "this server has no SAE loaded", "edits")
        ids = [s["name"] for s in saes]
        check_splice(saes, self.to_edits(body.edits, ids, "edits") + self.to_vectors(body.vectors, ids, "vectors"),
                     [], "edits")


def to_conditions(conds: list[P.SAECondition], ids: list[str], param: str) -> list[Condition]:
    return [Condition(_sae_name(c.sae, None, ids, f"{param}.{i}"), c.feature, c.above) for i, c in enumerate(conds)]


# ---- preset routes ------------------------------------------------------------------------------------------
router = APIRouter(responses=errors.documented(400, 401, 413, 429, 503))
NamePath = FastAPIPath(..., pattern=P.PRESET_NAME, description="letters, digits, _ and -; at most 64")


def steering_of(request: Request) -> Steering:
    return request.app.state.saelora.steering


@router.get("/v1/steering/presets", response_model=P.PresetList)
async def list_presets(st: Steering = Depends(steering_of)) -> P.PresetList:
    return P.PresetList(data=[P.PresetInfo(name=n, **p.model_dump()) for n, p in sorted(st.presets.items.items())])


@router.get("/v1/steering/presets/{name}", response_model=P.PresetInfo, responses=errors.documented(404))
async def get_preset(name: str = NamePath, st: Steering = Depends(steering_of)) -> P.PresetInfo:
    return P.PresetInfo(name=name, **st.presets.get(name).model_dump())


@router.put("/v1/steering/presets/{name}", response_model=P.PresetInfo, responses=errors.documented(403, 404, 409))
async def put_preset(body: P.SteeringPreset, name: str = NamePath,
                     st: Steering = Depends(steering_of)) -> P.PresetInfo:
    st.check_preset(body)
    st.presets.put(name, body)
    return P.PresetInfo(name=name, **body.model_dump())


@router.delete("/v1/steering/presets/{name}", responses=errors.documented(403, 404))
async def delete_preset(name: str = NamePath, st: Steering = Depends(steering_of)) -> dict:
    st.presets.delete(name)
    return {"status": "deleted", "name": name}
