"""The FastAPI app: module-level routes over `Handlers`; auth, body limit and metrics as middleware.

`create_app` builds one `ServerState` (the engine and what serves it) and hangs it on `app.state`; every route
reads it from there, so the routes are plain module-level functions of one router.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from saelora import __version__
from saelora.adapters.config import descriptions_file
from saelora.clients import protocol as P

from ..core.engine import Engine, EngineError
from . import errors
from .handlers import Handlers
from .metrics import Metrics

log = logging.getLogger(__name__)
MAX_BODY = 2 * 1024 * 1024
OPEN_PATHS = {"/health"}


@dataclass
class ServerState:
    """What every route works with: the engine, the handlers over it, the metrics, and the server's settings."""

    engine: Engine
    served_name: str
    api_key: str | None
    max_body: int
    metrics: Metrics
    handlers: Handlers
    descriptions: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # read once per SAE


def state(request: Request) -> ServerState:
    return request.app.state.saelora


def ready(s: ServerState = Depends(state)) -> ServerState:
    """The state, once the engine is ready (503 before)."""
    if not s.engine.ready:
        raise EngineError("not_ready", "the model is not loaded yet")
    return s


def create_app(engine: Engine, served_name: str, api_key: str | None = None, max_body: int = MAX_BODY) -> FastAPI:
    metrics = Metrics(engine)
    handlers = Handlers(engine, served_name, on_finish=metrics.count_tokens)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="saelora", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API with per-token SAE latents, latent steering and LoRA hot-swap.")
    app.state.saelora = ServerState(engine, served_name, api_key, max_body, metrics, handlers)
    errors.install(app)
    app.middleware("http")(guard)
    app.include_router(router)
    return app


async def guard(request: Request, call_next):  # noqa: ANN001, ANN201
    """Auth (Bearer key on every path but /health), the body limit, and request metrics."""
    s: ServerState = request.app.state.saelora
    t0, route = time.perf_counter(), _route_label(request.url.path)
    if s.api_key and request.url.path not in OPEN_PATHS:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), s.api_key.encode()):
            s.metrics.requests.labels(route, 401).inc()
            return errors.envelope(401, "unauthorized", "invalid or missing API key (Authorization: Bearer)")
    length = request.headers.get("content-length")
    too_large = length is not None and (not length.isdigit() or int(length) > s.max_body)
    if length is None and request.method == "POST":
        too_large = len(await request.body()) > s.max_body  # chunked upload: measure what actually came
    if too_large:
        s.metrics.requests.labels(route, 413).inc()
        return errors.envelope(413, "too_large", f"request body over {s.max_body} bytes")
    response = await call_next(request)
    s.metrics.requests.labels(route, response.status_code).inc()
    s.metrics.latency.labels(route).observe(time.perf_counter() - t0)
    return response


router = APIRouter()


def _respond(result: Any) -> Any:
    if hasattr(result, "__aiter__"):
        return StreamingResponse(result, media_type="text/event-stream")
    return result


@router.get("/health")
async def health(s: ServerState = Depends(state)) -> Response:
    if not s.engine.ready:
        return errors.envelope(503, "not_ready", "the model is not loaded yet")
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def prometheus(s: ServerState = Depends(state)) -> Response:
    return Response(s.metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models", response_model=P.ModelList)
async def models(s: ServerState = Depends(state)) -> P.ModelList:
    cards = [P.ModelCard(id=s.served_name, root=s.served_name, saes=s.engine.saes())]
    cards += [P.ModelCard(id=a["name"], root=a["path"], parent=s.served_name, saes=[{"hook": h} for h in a["saes"]])
              for a in s.engine.adapters()]
    return P.ModelList(data=cards)


@router.post("/v1/completions", response_model=None)
async def completions(body: P.CompletionRequest, s: ServerState = Depends(ready)) -> Any:
    return _respond(await s.handlers.completion(body))


@router.post("/v1/chat/completions", response_model=None)
async def chat(body: P.ChatCompletionRequest, s: ServerState = Depends(ready)) -> Any:
    return _respond(await s.handlers.chat(body))


@router.post("/v1/features", response_model=P.FeaturesResponse)
async def features(body: P.FeaturesRequest, s: ServerState = Depends(ready)) -> P.FeaturesResponse:
    return await s.handlers.features(body)


@router.get("/v1/saes", response_model=P.SAEList)
async def saes(s: ServerState = Depends(state)) -> P.SAEList:
    return P.SAEList(data=[P.SAEInfo(id=d["name"], hook=d["hook"], architecture=d["architecture"], d_in=d["d_in"],
                                     d_sae=d["d_sae"], source=d["source"], fingerprint=d["fingerprint"]["id"],
                                     has_descriptions=descriptions_file(d["source"]).is_file(), policy=d.get("policy"))
                           for d in s.engine.saes()])


@router.get("/v1/saes/{sae_id}/features/{index}", response_model=P.FeatureDescription)
async def feature(sae_id: str, index: int, s: ServerState = Depends(state)) -> P.FeatureDescription:
    sae = next((d for d in s.engine.saes() if d["name"] == sae_id), None)
    if sae is None:
        raise EngineError("not_found", f"no SAE {sae_id!r}; see GET /v1/saes", "sae_id")
    if not 0 <= index < sae["d_sae"]:
        raise EngineError("invalid", f"feature index {index} outside [0, {sae['d_sae']})", "index")
    if sae_id not in s.descriptions:
        path = descriptions_file(sae["source"])
        s.descriptions[sae_id] = json.loads(path.read_text()) if path.is_file() else None
    data = s.descriptions[sae_id]
    if data is None:
        return P.FeatureDescription(sae=sae_id, index=index)
    f = data["features"][index]
    return P.FeatureDescription(sae=sae_id, index=index, density=f["density"], max=f["max"], top=f["top"],
                                described=True)


@router.get("/v1/adapters", response_model=P.AdapterList)
async def adapters(s: ServerState = Depends(state)) -> P.AdapterList:
    return P.AdapterList(data=[P.AdapterInfo(**a) for a in s.engine.adapters()])


@router.post("/v1/load_lora_adapter")
async def load_lora(body: P.LoadLoRARequest, s: ServerState = Depends(ready)) -> JSONResponse:
    info = await s.engine.load_adapter(body.lora_name, body.lora_path)
    return JSONResponse({"status": "loaded", "adapter": info})


@router.post("/v1/unload_lora_adapter")
async def unload_lora(body: P.UnloadLoRARequest, s: ServerState = Depends(ready)) -> JSONResponse:
    await s.engine.unload_adapter(body.lora_name)
    return JSONResponse({"status": "unloaded", "lora_name": body.lora_name})


_ROUTES = {"/health", "/metrics", "/docs", "/openapi.json", "/v1/models", "/v1/completions", "/v1/chat/completions",
           "/v1/features", "/v1/saes", "/v1/adapters", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"}


def _route_label(path: str) -> str:
    """Metric label for a path: the route template, so label cardinality stays bounded."""
    if path in _ROUTES:
        return path
    return "/v1/saes/{id}/features/{index}" if path.startswith("/v1/saes/") else "other"
