"""The FastAPI app: module-level routes over `Handlers`; auth, body limit and metrics as middleware.

`create_app` builds one `ServerState` (the engine and what serves it) and hangs it on `app.state`; every route
reads it from there, so the routes are plain module-level functions of one router.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi import Path as FastAPIPath
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from saelora import __version__
from saelora.adapters.config import descriptions_file
from saelora.clients import protocol as P

from ..core.engine import Engine, EngineError
from . import errors, names, steer_routes, steering, ui
from .handlers import Handlers
from .metrics import Metrics
from .steering import Steering
from .wire import wire_logits

log = logging.getLogger(__name__)
MAX_BODY = 2 * 1024 * 1024
OPEN_PATHS = {"/health"}
OPEN_PREFIXES = ("/ui",)  # the web page's own files: it holds no data, and asks for the key to call the API
ADMIN_PATHS = {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"}  # change what every client is served
ADMIN_PREFIXES = ("/v1/steering/presets/", "/v1/steering/vectors/", "/v1/steering/auto")  # ... with these methods
ADMIN_METHODS = {"PUT", "DELETE", "POST", "PATCH"}


@dataclass
class ServerState:
    """What every route works with: the engine, the handlers over it, the metrics, and the server's settings."""

    engine: Engine
    served_name: str
    api_key: str | None
    max_body: int
    admin_api_key: str | None
    allowed_hosts: list[str] | None
    metrics: Metrics
    handlers: Handlers
    steering: Steering  # presets, vectors, feature descriptions
    draining: bool = False  # shutting down: in-flight requests finish, new ones get 503

    def drain(self) -> None:
        """From now on every new request is refused with 503 (the server is shutting down)."""
        self.draining = True


def state(request: Request) -> ServerState:
    return request.app.state.saelora


def ready(s: ServerState = Depends(state)) -> ServerState:
    """The state, once the engine is ready (503 before)."""
    if not s.engine.ready:
        raise EngineError("not_ready", s.engine.not_ready_reason)
    return s


def create_app(engine: Engine, served_name: str, api_key: str | None = None, max_body: int = MAX_BODY,
               admin_api_key: str | None = None, allowed_hosts: list[str] | None = None,
               presets_dir: str | None = None, allow_origins: list[str] | None = None) -> FastAPI:
    """The server over `engine`. With `api_key`, every route but /health needs it. Adapter load/unload need
    `admin_api_key` when one is set; with only `api_key` set they are refused (403): the inference key alone
    cannot change what other clients are served. With neither (a local server), everything is open.
    `allowed_hosts`: Host headers accepted (others: 400); `saelora serve` sets the loopback names when bound to
    loopback, so a web page cannot reach the local server through DNS rebinding. Steering presets live in
    `presets_dir` (one JSON file each; None: in memory only), and changing them needs the admin key like adapters."""
    metrics = Metrics(engine)
    steer = Steering(engine, presets_dir)
    handlers = Handlers(engine, served_name, on_finish=metrics.count_tokens, steering=steer)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="saelora", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API with per-token SAE latents, latent steering and LoRA hot-swap.")
    app.state.saelora = ServerState(engine, served_name, api_key, max_body, admin_api_key, allowed_hosts, metrics,
                                    handlers, steer)
    errors.install(app)
    app.add_middleware(BodyLimit, max_body=max_body)
    app.add_middleware(Guard)
    if allow_origins:  # outside the Guard: a browser's preflight carries no key (docs/deployment.md)
        app.add_middleware(CORSMiddleware, allow_origins=allow_origins, allow_methods=["*"],
                           allow_headers=["Authorization", "Content-Type"])
    app.include_router(router)
    app.include_router(ui.router)
    app.include_router(steering.router)
    for r in steer_routes.routers(engine.steers_from_text):
        app.include_router(r)
    vocab = len(engine.tokenizer)
    app.openapi = lambda: errors.openapi_without_422(app, vocab)  # type: ignore[method-assign]
    return app


class BodyLimit:
    """Counts a request body as it streams in and refuses it with 413 once past `max_body` bytes, so a chunked
    upload without Content-Length is never buffered whole."""

    def __init__(self, app: Any, max_body: int) -> None:
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise StarletteHTTPException(413, f"request body over {self.max_body} bytes")
            return message

        await self.app(scope, counted, send)


class Guard:
    """The Host header (when the server restricts it), auth (Bearer key on every path but /health; the admin key
    for adapter management), the declared body size, and request metrics; every refusal in the OpenAI envelope.
    Pure ASGI, so handlers still see client disconnects."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        s: ServerState = scope["app"].state.saelora
        path = scope["path"]  # the routed path, not one rebuilt from headers
        t0, route = time.perf_counter(), _route_label(path)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        length = headers.get("content-length")  # bodies without one are counted as they arrive (BodyLimit)
        refusal = _host_refusal(s, headers.get("host", "")) or _auth_refusal(s, path, scope.get("method", ""),
                                                                             headers.get("authorization", ""))
        if refusal is None and length is not None and (not length.isdigit() or int(length) > s.max_body):
            refusal = errors.envelope(413, "too_large", f"request body over {s.max_body} bytes")
        if refusal is None and s.draining:
            refusal = errors.envelope(503, "not_ready", "the server is shutting down")
        if refusal is not None:
            s.metrics.requests.labels(route, refusal.status_code).inc()
            return await refusal(scope, receive, send)
        status = {"code": 500}

        async def send_and_count(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        finally:
            s.metrics.requests.labels(route, status["code"]).inc()
            s.metrics.latency.labels(route).observe(time.perf_counter() - t0)


def _host_refusal(s: ServerState, host: str) -> Response | None:
    """400 for a Host header outside `allowed_hosts` (DNS rebinding against a loopback server), else None."""
    if not s.allowed_hosts:
        return None
    name = host[:host.find("]") + 1] if host.startswith("[") else host.split(":")[0]
    if name in s.allowed_hosts:
        return None
    return errors.envelope(400, "invalid", f"Host {name!r} is not served here (allowed: {s.allowed_hosts})")


def _open(path: str) -> bool:
    return path in OPEN_PATHS or any(path == p or path.startswith(p + "/") for p in OPEN_PREFIXES)


def _auth_refusal(s: ServerState, path: str, method: str, authorization: str) -> Response | None:
    """The 401/403 answer for this path, method and Authorization header, or None when the request may go on."""
    scheme, _, token = authorization.strip().partition(" ")
    given = token.strip().encode() if scheme.lower() == "bearer" else b""  # the scheme is case-insensitive
    admin = path in ADMIN_PATHS or (path.startswith(ADMIN_PREFIXES) and method in ADMIN_METHODS)
    if admin and (s.admin_api_key or s.api_key):
        if not s.admin_api_key:
            return errors.envelope(403, "forbidden", "adapter and steering-preset management is off: start the "
                                                     "server with --admin-api-key to allow it")
        if not hmac.compare_digest(given, s.admin_api_key.encode()):
            return errors.envelope(401, "unauthorized", "adapter and steering-preset management need the admin "
                                                        "API key")
        return None
    if s.api_key and not _open(path) and not hmac.compare_digest(given, s.api_key.encode()) and not (
            s.admin_api_key and hmac.compare_digest(given, s.admin_api_key.encode())):  # the admin key works too
        return errors.envelope(401, "unauthorized", "invalid or missing API key (Authorization: Bearer)")
    return None


# With `stream: true` the answer is server-sent events; each event's `data` is a JSON chunk, then `[DONE]`.
_SSE_EVENT = {"type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"},
                                               "id": {"type": "string"}}}
_STREAM_OR_JSON = {200: {"description": "the response, or with `stream: true` server-sent events",
                         "content": {"text/event-stream": {"schema": _SSE_EVENT}}}}
# Every route can answer these (auth, body limit, invalid input, not ready, overload); some add 403 / 404 / 409.
router = APIRouter(responses=errors.documented(400, 401, 413, 429, 503))


def _respond(result: Any) -> Any:
    if hasattr(result, "__aiter__"):
        return StreamingResponse(result, media_type="text/event-stream")  # stops (and closes) on disconnect
    return result


async def _unless_disconnected(request: Request, work: Any) -> Any:
    """Run a handler coroutine, cancelling it when the client goes away: its rows are dropped (queued or running)
    instead of generating for nobody. Streaming responses get the same from Starlette."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.1)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return Response(status_code=499)  # nobody reads it


@router.get("/health")
async def health(s: ServerState = Depends(state)) -> Response:
    if not s.engine.ready:
        return errors.envelope(503, "not_ready", s.engine.not_ready_reason)
    return JSONResponse({"status": "ok"})


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text format"}})
async def prometheus(s: ServerState = Depends(state)) -> Response:
    return Response(s.metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models", response_model=P.ModelList)
async def models(s: ServerState = Depends(state)) -> P.ModelList:
    """The base model, each adapter, and the names that carry the splice (serve/api/names.py), as they are now."""
    limit = s.engine.max_model_len  # ServeConfig.max_model_len within the model's positions
    saes, adapters = s.engine.saes(), {a["name"]: a for a in s.engine.adapters()}
    cards = {s.served_name: P.ModelCard(id=s.served_name, root=s.served_name, max_model_len=limit,
                                        saes=[_public_sae(d) for d in saes])}
    cards |= {n: P.ModelCard(id=n, root=a["path"], parent=s.served_name, max_model_len=limit,
                             saes=[{"hook": h} for h in a["saes"]]) for n, a in adapters.items()}
    derived = [P.ModelCard(id=n, root=cards[plain].root, parent=plain, max_model_len=limit, saes=cards[plain].saes)
               for n, plain in names.listing(s.served_name, adapters, s.steering.presets.items, bool(saes))
               if n != plain]
    return P.ModelList(data=[*cards.values(), *derived])


@router.post("/v1/completions", response_model=P.CompletionResponse,
             responses={**errors.documented(404, 504), **_STREAM_OR_JSON})
async def completions(body: P.CompletionRequest, request: Request, s: ServerState = Depends(ready)) -> Any:
    return _respond(await _unless_disconnected(request, s.handlers.completion(body)))


@router.post("/v1/chat/completions", response_model=P.ChatCompletionResponse,
             responses={**errors.documented(404, 504), **_STREAM_OR_JSON})
async def chat(body: P.ChatCompletionRequest, request: Request, s: ServerState = Depends(ready)) -> Any:
    return _respond(await _unless_disconnected(request, s.handlers.chat(body)))


@router.post("/v1/features", response_model=P.FeaturesResponse, responses=errors.documented(404))
async def features(body: P.FeaturesRequest, s: ServerState = Depends(ready)) -> Any:
    return await s.handlers.features(body)


@router.get("/v1/saes", response_model=P.SAEList)
async def saes(s: ServerState = Depends(state)) -> P.SAEList:
    return P.SAEList(data=[P.SAEInfo(id=d["name"], hook=d["hook"], architecture=d["architecture"], d_in=d["d_in"],
                                     d_sae=d["d_sae"], source=_public_source(d["source"]),
                                     fingerprint=d["fingerprint"]["id"],
                                     has_descriptions=descriptions_file(d["source"]).is_file(), policy=d.get("policy"))
                           for d in s.engine.saes()])


def histogram(data: dict[str, Any], f: dict[str, Any]) -> P.FeatureHistogram | None:
    """A latent's stored histogram (trimmed: bins lo, lo + 1, ... of the file's edges) with its own edges."""
    h, edges = f.get("hist"), data.get("hist_edges")
    if not h or not edges or not h["counts"]:
        return None
    full = [0.0, *edges, f["max"] if f["max"] > edges[-1] else edges[-1] * 2 ** 0.5]  # bin 0 from 0, last to max
    lo, n = h["lo"], len(h["counts"])
    return P.FeatureHistogram(edges=full[lo:lo + n + 1], counts=h["counts"])


@router.get("/v1/saes/{sae_id}/features/{index}", response_model=P.FeatureDescription,
            responses=errors.documented(404))
async def feature(sae_id: str, index: int = FastAPIPath(..., ge=0),
                  s: ServerState = Depends(state)) -> P.FeatureDescription:
    s.steering.latent(sae_id, index)
    data = s.steering.descriptions(sae_id)
    logits = wire_logits(await s.engine.latent_logits(sae_id, index, P.LOGIT_TOP), s.engine.tokenizer)
    if data is None:
        return P.FeatureDescription(sae=sae_id, index=index, logits=logits)
    f = data["features"][index]
    return P.FeatureDescription(sae=sae_id, index=index, density=f["density"], max=f["max"], top=f["top"],
                                described=True, logits=logits, histogram=histogram(data, f))


@router.get("/v1/adapters", response_model=P.AdapterList)
async def adapters(s: ServerState = Depends(state)) -> P.AdapterList:
    return P.AdapterList(data=[P.AdapterInfo(**a) for a in s.engine.adapters()])


@router.post("/v1/load_lora_adapter", responses=errors.documented(403, 404, 409))
async def load_lora(body: P.LoadLoRARequest, s: ServerState = Depends(ready)) -> JSONResponse:
    info = await s.engine.load_adapter(body.lora_name, body.lora_path)
    return JSONResponse({"status": "loaded", "adapter": info})


@router.post("/v1/unload_lora_adapter", responses=errors.documented(403, 404, 409))
async def unload_lora(body: P.UnloadLoRARequest, s: ServerState = Depends(ready)) -> JSONResponse:
    await s.engine.unload_adapter(body.lora_name)
    return JSONResponse({"status": "unloaded", "lora_name": body.lora_name})


def _public_source(source: str) -> str:
    """An SAE's source as responses show it: a local folder by its name only, never the server's path."""
    return Path(source).name if os.path.isabs(source) else source


def _public_sae(d: dict[str, Any]) -> dict[str, Any]:
    return {**d, "source": _public_source(d["source"])}


_ROUTES = {"/health", "/metrics", "/docs", "/openapi.json", "/v1/models", "/v1/completions", "/v1/chat/completions",
           "/v1/features", "/v1/saes", "/v1/adapters", "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
           "/v1/steering/presets", "/v1/steering/vectors", "/v1/steering/auto"}


def _route_label(path: str) -> str:
    """Metric label for a path: the route template, so label cardinality stays bounded."""
    if path in _ROUTES:
        return path
    if path.startswith("/v1/steering/presets/"):
        return "/v1/steering/presets/{name}"
    if path.startswith("/v1/steering/vectors/"):
        return "/v1/steering/vectors/{name}"
    if path.startswith("/v1/saes/") and path.endswith("/search"):
        return "/v1/saes/{id}/search"
    return "/v1/saes/{id}/features/{index}" if path.startswith("/v1/saes/") else "other"
