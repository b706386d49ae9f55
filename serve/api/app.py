"""The FastAPI app: a thin router over `Handlers`; auth, body limit and metrics as middleware."""

from __future__ import annotations

import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from saelora import __version__
from saelora.adapters.config import descriptions_file
from saelora.clients import protocol as P

from . import errors
from ..core.engine import Engine, EngineError
from .handlers import Handlers
from .metrics import Metrics

log = logging.getLogger(__name__)
MAX_BODY = 2 * 1024 * 1024
OPEN_PATHS = {"/health"}


def create_app(engine: Engine, served_name: str, api_key: str | None = None, max_body: int = MAX_BODY) -> FastAPI:
    metrics = Metrics(engine)
    h = Handlers(engine, served_name, on_finish=metrics.count_tokens)
    descriptions: dict[str, dict[str, Any] | None] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="saelora", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API with per-token SAE latents, latent steering and LoRA hot-swap.")
    errors.install(app)

    @app.middleware("http")
    async def guard(request: Request, call_next):  # noqa: ANN001
        t0, route = time.perf_counter(), _route_label(request.url.path)
        if api_key and request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                response = errors.envelope(401, "unauthorized", "invalid or missing API key (Authorization: Bearer)")
                metrics.requests.labels(route, 401).inc()
                return response
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body):
            metrics.requests.labels(route, 413).inc()
            return errors.envelope(413, "too_large", f"request body over {max_body} bytes")
        if length is None and request.method == "POST":
            body = await request.body()  # chunked upload: measure what actually came
            if len(body) > max_body:
                return errors.envelope(413, "too_large", f"request body over {max_body} bytes")
        response = await call_next(request)
        metrics.requests.labels(route, response.status_code).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - t0)
        return response

    @app.get("/health")
    async def health() -> Response:
        if not engine.ready:
            return errors.envelope(503, "not_ready", "the model is not loaded yet")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    def _ready() -> None:
        if not engine.ready:
            raise EngineError("not_ready", "the model is not loaded yet")

    @app.get("/v1/models", response_model=P.ModelList)
    async def models() -> P.ModelList:
        saes = engine.saes()
        cards = [P.ModelCard(id=served_name, root=served_name, saes=saes)]
        cards += [P.ModelCard(id=a["name"], root=a["path"], parent=served_name, saes=[{"hook": s} for s in a["saes"]])
                  for a in engine.adapters()]
        return P.ModelList(data=cards)

    def _respond(result: Any) -> Any:
        if hasattr(result, "__aiter__"):
            return StreamingResponse(result, media_type="text/event-stream")
        return result

    @app.post("/v1/completions", response_model=None)
    async def completions(body: P.CompletionRequest) -> Any:
        _ready()
        return _respond(await h.completion(body))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: P.ChatCompletionRequest) -> Any:
        _ready()
        return _respond(await h.chat(body))

    @app.post("/v1/features", response_model=P.FeaturesResponse)
    async def features(body: P.FeaturesRequest) -> P.FeaturesResponse:
        _ready()
        return await h.features(body)

    @app.get("/v1/saes", response_model=P.SAEList)
    async def saes() -> P.SAEList:
        return P.SAEList(data=[P.SAEInfo(id=s["name"], hook=s["hook"], architecture=s["architecture"], d_in=s["d_in"],
                                         d_sae=s["d_sae"], source=s["source"], fingerprint=s["fingerprint"]["id"],
                                         has_descriptions=descriptions_file(s["source"]).is_file(),
                                         policy=s.get("policy"))
                                for s in engine.saes()])

    @app.get("/v1/saes/{sae_id}/features/{index}", response_model=P.FeatureDescription)
    async def feature(sae_id: str, index: int) -> P.FeatureDescription:
        sae = next((s for s in engine.saes() if s["name"] == sae_id), None)
        if sae is None:
            raise EngineError("not_found", f"no SAE {sae_id!r}; see GET /v1/saes", "sae_id")
        if not 0 <= index < sae["d_sae"]:
            raise EngineError("invalid", f"feature index {index} outside [0, {sae['d_sae']})", "index")
        if sae_id not in descriptions:
            path = descriptions_file(sae["source"])
            descriptions[sae_id] = json.loads(path.read_text()) if path.is_file() else None
        data = descriptions[sae_id]
        if data is None:
            return P.FeatureDescription(sae=sae_id, index=index)
        f = data["features"][index]
        return P.FeatureDescription(sae=sae_id, index=index, density=f["density"], max=f["max"], top=f["top"],
                                    described=True)

    @app.get("/v1/adapters", response_model=P.AdapterList)
    async def adapters() -> P.AdapterList:
        return P.AdapterList(data=[P.AdapterInfo(**a) for a in engine.adapters()])

    @app.post("/v1/load_lora_adapter")
    async def load_lora(body: P.LoadLoRARequest) -> JSONResponse:
        _ready()
        info = await engine.load_adapter(body.lora_name, body.lora_path)
        return JSONResponse({"status": "loaded", "adapter": info})

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(body: P.UnloadLoRARequest) -> JSONResponse:
        _ready()
        await engine.unload_adapter(body.lora_name)
        return JSONResponse({"status": "unloaded", "lora_name": body.lora_name})

    return app


_ROUTES = {"/health", "/metrics", "/docs", "/openapi.json", "/v1/models", "/v1/completions", "/v1/chat/completions",
           "/v1/features", "/v1/saes", "/v1/adapters", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"}


def _route_label(path: str) -> str:
    """Metric label for a path: the route template, so label cardinality stays bounded."""
    if path in _ROUTES:
        return path
    return "/v1/saes/{id}/features/{index}" if path.startswith("/v1/saes/") else "other"
