"""Routes for steering vectors, feature search and auto-steer (the preset routes are in steering.py).

    PUT    /v1/steering/vectors/{name}   numbers, or (engines that run the model here) DiffMean of two text sets
    GET    /v1/steering/vectors[/{name}]
    DELETE /v1/steering/vectors/{name}
    GET    /v1/saes/{sae}/search?q=...   latents whose top contexts or promoted tokens match the query words
    POST   /v1/steering/auto             search, sweep and judge from example texts; stores the winner as a preset

Changes need the admin key when the server has keys. The routes that read texts through the model (DiffMean,
auto-steer) are part of a server's API only when its engine `steers_from_text` (the torch engine): a vLLM
server's model weights live in vLLM's worker, so its OpenAPI schema offers numbers only, and auto-steer is a 404.
"""

from __future__ import annotations

import math
import re
from typing import Any

from fastapi import APIRouter, Depends, Path as FastAPIPath, Query

from saelora.adapters.autosteer import default_negatives
from saelora.adapters.edits import LatentEdit, VectorEdit
from saelora.clients import protocol as P
from saelora.clients import protocol_steer as PS

from ..core.engine import EngineError
from . import errors
from .steering import NamePath, Steering, _sae_name, steering_of

router = APIRouter(responses=errors.documented(400, 401, 413, 429, 503))  # every engine
values_router = APIRouter(responses=errors.documented(400, 401, 413, 429, 503))  # engines without `steers_from_text`
text_router = APIRouter(responses=errors.documented(400, 401, 413, 429, 503))  # engines with it


def _info(name: str, v: PS.StoredVector) -> PS.VectorInfo:
    return PS.VectorInfo(name=name, norm=round(math.hypot(*v.values), 6), **v.model_dump())


@router.get("/v1/steering/vectors", response_model=PS.VectorList)
async def list_vectors(st: Steering = Depends(steering_of)) -> PS.VectorList:
    return PS.VectorList(data=[_info(n, v) for n, v in sorted(st.vectors.items.items())])


@router.get("/v1/steering/vectors/{name}", response_model=PS.VectorInfo, responses=errors.documented(404))
async def get_vector(name: str = NamePath, st: Steering = Depends(steering_of)) -> PS.VectorInfo:
    return _info(name, st.vectors.get(name))


def _target(st: Steering, given: str | None) -> tuple[str, int]:
    """The SAE a vector acts at, and its residual width."""
    ids = [s["name"] for s in st.engine.saes()]
    if not ids:
        raise EngineError("invalid", "this server has no SAE loaded", "sae")
    sae = _sae_name(given, None, ids, "body")
    return sae, int(st.sae(sae)["d_in"])


async def _store_vector(st: Steering, name: str, body: PS.VectorFromValues | PS.VectorFromTexts) -> PS.VectorInfo:
    sae, d_in = _target(st, body.sae)
    if isinstance(body, PS.VectorFromValues):
        if len(body.values) != d_in:  # a direction this hook does not have: 404, as a latent outside d_sae is
            raise EngineError("not_found", f"SAE {sae!r} acts on a residual of {d_in} numbers; got "
                              f"{len(body.values)}", "values")
        stored = PS.StoredVector(sae=sae, values=list(body.values), source="values")
    else:
        values = await st.engine.steering_vector(sae, body.positive, body.negative)
        stored = PS.StoredVector(sae=sae, values=[round(v, 6) for v in values], source="diffmean",
                                 texts={"positive": len(body.positive), "negative": len(body.negative)})
    st.vectors.put(name, stored)
    return _info(name, stored)


@values_router.put("/v1/steering/vectors/{name}", response_model=PS.VectorInfo,
                   responses=errors.documented(403, 404, 409))
async def put_vector(body: PS.VectorFromValues, name: str = NamePath,
                     st: Steering = Depends(steering_of)) -> PS.VectorInfo:
    """Store a steering vector given as numbers."""
    return await _store_vector(st, name, body)


@text_router.put("/v1/steering/vectors/{name}", response_model=PS.VectorInfo,
                 responses=errors.documented(403, 404, 409))
async def put_vector_or_diffmean(body: PS.VectorFromValues | PS.VectorFromTexts, name: str = NamePath,
                                 st: Steering = Depends(steering_of)) -> PS.VectorInfo:
    """Store a steering vector given as numbers, or made from two text sets (DiffMean)."""
    return await _store_vector(st, name, body)


@router.delete("/v1/steering/vectors/{name}", responses=errors.documented(403, 404))
async def delete_vector(name: str = NamePath, st: Steering = Depends(steering_of)) -> dict:
    st.vectors.delete(name)
    return {"status": "deleted", "name": name}


def routers(steers_from_text: bool) -> list[APIRouter]:
    """The steering routes a server over an engine offers."""
    return [router, text_router if steers_from_text else values_router]


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if w}


def search_features(data: dict[str, Any], query: str, n: int) -> list[PS.SearchHit]:
    """Latents whose top-context tokens (weight 1 each) or promoted tokens (weight 2 each: what steering writes)
    match a query word, best first; ties to the denser latent."""
    want = _words(query)
    hits = []
    for f in data["features"]:
        tokens = [c["token"] for c in f.get("top", [])]
        promoted = [t["token"] for t in (f.get("logits") or {}).get("promoted", [])]
        score = sum(bool(_words(t) & want) for t in tokens) + 2 * sum(bool(_words(t) & want) for t in promoted)
        if score:
            hits.append(PS.SearchHit(index=f["index"], score=score, density=f["density"], max=f["max"],
                                     tokens=tokens, promoted=promoted))
    hits.sort(key=lambda h: (-h.score, -h.density, h.index))
    return hits[:n]


@router.get("/v1/saes/{sae_id}/search", response_model=PS.SearchResponse, responses=errors.documented(404))
async def search(sae_id: str, q: str = Query(..., min_length=1, max_length=200, pattern=r"[A-Za-z0-9]",
                                            description="words or tokens (at least one letter or digit)"),
                 n: int = Query(10, ge=1, le=PS.MAX_SEARCH), st: Steering = Depends(steering_of)) -> PS.SearchResponse:
    data = st.descriptions(sae_id)
    if data is None:
        raise EngineError("not_found", f"SAE {sae_id!r} has no feature descriptions: run `saelora features` for it",
                          "sae_id")
    if not _words(q):
        raise EngineError("invalid", "the query has no letters or digits to search for", "q")
    return PS.SearchResponse(sae=sae_id, query=q, data=search_features(data, q, n))


@router.get("/v1/saes/{sae_id}/features/{index}/similar", response_model=PS.SimilarResponse,
            responses=errors.documented(404))
async def similar(sae_id: str, index: int = FastAPIPath(..., ge=0), n: int = Query(10, ge=1, le=PS.MAX_SEARCH),
                  st: Steering = Depends(steering_of)) -> PS.SimilarResponse:
    """The latents closest to this one by decoder direction (cosine): what a feature page's "find similar" shows."""
    st.latent(sae_id, index)
    pairs = await st.engine.similar_latents(sae_id, index, n)
    return PS.SimilarResponse(sae=sae_id, index=index, data=[PS.SimilarLatent(index=i, cosine=c) for i, c in pairs])


def _wire(edits: list[Any]) -> P.SteeringPreset:
    """Engine edits (raw values) as a preset on the wire."""
    latents = [P.SAEEdit(sae=e.sae, feature=e.feature, op=e.op, value=e.value, positions=e.positions)
               for e in edits if isinstance(e, LatentEdit)]
    vectors = [P.SAEVectorValues(sae=e.sae, values=list(e.vector), op=e.op, value=e.value, positions=e.positions)
               for e in edits if isinstance(e, VectorEdit)]
    return P.SteeringPreset(edits=latents, vectors=vectors)


@text_router.post("/v1/steering/auto", response_model=PS.AutoSteerResponse,
                  responses=errors.documented(403, 404, 409))
async def auto(body: PS.AutoSteerRequest, st: Steering = Depends(steering_of)) -> PS.AutoSteerResponse:
    ids = [s["name"] for s in st.engine.saes()]
    if not ids:
        raise EngineError("invalid", "this server has no SAE loaded", "sae")
    sae = _sae_name(body.sae, None, ids, "body")
    st.sae(sae)
    if body.name not in st.presets.items and len(st.presets.items) >= P.MAX_PRESETS:
        raise EngineError("conflict", f"at most {P.MAX_PRESETS} presets; delete one first", "name")
    res = await st.engine.auto_steer(sae, body.positive, body.negative or default_negatives(), body.prompts,
                                     body.max_fluency_gap)
    preset = _wire(res.edits)
    st.presets.put(body.name, preset)
    return PS.AutoSteerResponse(preset=P.PresetInfo(name=body.name, **preset.model_dump()), measured=res.measured,
                                candidates=[{"method": c.method, "strength": c.strength, **c.summary}
                                            for c in res.candidates], seconds=round(res.seconds, 2))
