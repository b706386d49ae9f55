"""Steering at the HTTP edge: request edits and conditions to the engine's vocabulary, named presets (kept as
JSON files so they survive restarts) and their routes.

A request's edits are its preset's edits followed by its own; its mode is its own when it sets one, else the
preset's. Edits and conditions are checked against the loaded SAEs with the same checks the splice uses
(adapters/edits.py): an SAE or latent the server does not have is a 404, anything else out of bounds a 400.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi import Path as FastAPIPath

from saelora.adapters.edits import Condition, LatentEdit, SpliceError
from saelora.adapters.splice import check_edits
from saelora.clients import protocol as P

from ..core.engine import Engine, EngineError
from . import errors

log = logging.getLogger(__name__)


class PresetStore:
    """Named steering presets, in memory and, with `folder`, one `<name>.json` file each (written atomically)."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder) if folder else None
        self.presets: dict[str, P.SteeringPreset] = {}
        self._lock = threading.Lock()
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            for f in sorted(self.folder.glob("*.json")):
                try:
                    self.presets[f.stem] = P.SteeringPreset.model_validate_json(f.read_text())
                except ValueError as e:
                    log.warning("steering preset %s skipped: %s", f, e)
            log.info("%d steering preset(s) from %s", len(self.presets), self.folder)

    def get(self, name: str) -> P.SteeringPreset:
        if name not in self.presets:
            raise EngineError("not_found", f"no steering preset {name!r} (GET /v1/steering/presets)", "preset")
        return self.presets[name]

    def put(self, name: str, preset: P.SteeringPreset) -> bool:
        """Store (or replace) a preset; returns whether it is new."""
        with self._lock:
            new = name not in self.presets
            if new and len(self.presets) >= P.MAX_PRESETS:
                raise EngineError("conflict", f"at most {P.MAX_PRESETS} presets; delete one first", "name")
            if self.folder is not None:
                fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
                with os.fdopen(fd, "w") as f:
                    f.write(preset.model_dump_json(indent=1))
                os.replace(tmp, self.folder / f"{name}.json")
            self.presets[name] = preset
            return new

    def delete(self, name: str) -> None:
        with self._lock:
            self.get(name)
            if self.folder is not None:
                (self.folder / f"{name}.json").unlink(missing_ok=True)
            del self.presets[name]


def _sae_name(given: str | None, default: str | None, ids: list[str], param: str) -> str:
    if given is not None:
        return given
    if default is not None:
        return default
    if len(ids) != 1:
        raise EngineError("invalid", f"{param}.sae is required: several SAEs are loaded {ids}", f"{param}.sae")
    return ids[0]


def to_edits(edits: list[P.SAEEdit], ids: list[str], param: str) -> list[LatentEdit]:
    out = []
    for i, e in enumerate(edits):
        name = _sae_name(e.sae, None, ids, f"{param}.{i}")
        when = None
        if e.when is not None:
            when = Condition(_sae_name(e.when.sae, name, ids, f"{param}.{i}.when"), e.when.feature, e.when.above)
        positions = tuple(e.positions) if isinstance(e.positions, list) else e.positions
        out.append(LatentEdit(name, e.feature, e.op, e.value, positions, when))
    return out


def to_conditions(conds: list[P.SAECondition], ids: list[str], param: str) -> list[Condition]:
    return [Condition(_sae_name(c.sae, None, ids, f"{param}.{i}"), c.feature, c.above) for i, c in enumerate(conds)]


def check_against(saes: list[dict[str, Any]], edits: list[LatentEdit], conds: list[Condition], param: str) -> None:
    """EngineError (404 for an SAE or latent the server lacks, else 400) unless every edit and condition fits the
    SAEs as `Engine.saes()` lists them: the splice's own check (`check_edits`)."""
    try:
        check_edits({s["name"]: int(s["d_sae"]) for s in saes}, edits, conds)
    except SpliceError as e:
        raise EngineError.from_splice(e, param) from e


# ---- routes -------------------------------------------------------------------------------------------------
router = APIRouter(responses=errors.documented(400, 401, 413, 429, 503))
NamePath = FastAPIPath(..., pattern=P.PRESET_NAME, description="letters, digits, _ and -; at most 64")


def _store(request: Request) -> tuple[PresetStore, Engine]:
    s = request.app.state.saelora
    return s.presets, s.engine


@router.get("/v1/steering/presets", response_model=P.PresetList)
async def list_presets(deps: tuple[PresetStore, Engine] = Depends(_store)) -> P.PresetList:
    store, _ = deps
    return P.PresetList(data=[P.PresetInfo(name=n, **p.model_dump()) for n, p in sorted(store.presets.items())])


@router.get("/v1/steering/presets/{name}", response_model=P.PresetInfo, responses=errors.documented(404))
async def get_preset(name: str = NamePath, deps: tuple[PresetStore, Engine] = Depends(_store)) -> P.PresetInfo:
    return P.PresetInfo(name=name, **deps[0].get(name).model_dump())


@router.put("/v1/steering/presets/{name}", response_model=P.PresetInfo, responses=errors.documented(403, 404, 409))
async def put_preset(body: P.SteeringPreset, name: str = NamePath,
                     deps: tuple[PresetStore, Engine] = Depends(_store)) -> P.PresetInfo:
    store, engine = deps
    saes = engine.saes()
    if not saes:
        raise EngineError("invalid", "this server has no SAE loaded", "edits")
    ids = [s["name"] for s in saes]
    check_against(saes, to_edits(body.edits, ids, "edits"), [], "edits")
    store.put(name, body)
    return P.PresetInfo(name=name, **body.model_dump())


@router.delete("/v1/steering/presets/{name}", responses=errors.documented(403, 404))
async def delete_preset(name: str = NamePath, deps: tuple[PresetStore, Engine] = Depends(_store)) -> dict:
    deps[0].delete(name)
    return {"status": "deleted", "name": name}

