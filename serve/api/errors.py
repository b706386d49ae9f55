"""Every error leaves the server as the OpenAI envelope {"error": {message, type, param, code}}; the mapping
from exceptions to statuses lives here and nowhere else."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from saelora.adapters.errors import SaeloraError
from saelora.clients.protocol import ErrorResponse

from ..core.engine import EngineError, report_bug


# EngineError.kind -> (HTTP status, OpenAI error type); a test checks it covers ERROR_KINDS exactly.
KINDS: dict[str, tuple[int, str]] = {
    "invalid": (400, "invalid_request_error"),
    "context_length": (400, "invalid_request_error"),
    "unauthorized": (401, "authentication_error"),
    "forbidden": (403, "permission_error"),
    "not_found": (404, "not_found_error"),
    "conflict": (409, "conflict_error"),
    "too_large": (413, "invalid_request_error"),
    "queue_full": (429, "rate_limit_error"),
    "internal": (500, "internal_server_error"),
    "not_ready": (503, "service_unavailable_error"),
    "timeout": (504, "timeout_error"),
}
# EngineError.kind -> the envelope's `code`: a string everywhere, OpenAI's own where it has one
CODES: dict[str, str] = {"invalid": "invalid_request", "context_length": "context_length_exceeded",
                         "unauthorized": "invalid_api_key", "forbidden": "forbidden", "not_found": "not_found",
                         "conflict": "conflict", "too_large": "request_too_large", "queue_full": "rate_limit_exceeded",
                         "internal": "internal_error", "not_ready": "service_unavailable",
                         "timeout": "request_timeout"}
RETRY_AFTER_S = 1


def envelope(status: int, kind: str, message: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": KINDS.get(kind, (status, kind))[1], "param": param,
                      "code": CODES.get(kind, kind)}}
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=headers)


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses, each with the envelope's schema."""
    names: dict[int, str] = {}
    for kind, (status, _) in KINDS.items():
        names.setdefault(status, kind)
    return {status: {"model": ErrorResponse, "description": f"{names.get(status, 'error')} (OpenAI error envelope)"}
            for status in statuses}


def openapi_without_422(app: FastAPI, vocab_size: int) -> dict[str, Any]:
    """The app's OpenAPI document with FastAPI's automatic 422 answers removed: validation errors are 400 here,
    in the envelope, and every route documents that. A token-id prompt's ids get this server's vocabulary as
    their bound (the pydantic models cannot know it)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for ops in doc.get("paths", {}).values():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
        schemas = doc.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        for alt in schemas.get("CompletionRequest", {}).get("properties", {}).get("prompt", {}).get("anyOf", []):
            items = alt.get("items", {}) if alt.get("type") == "array" else {}
            if items.get("type") == "array":  # a one-element list of token-id lists (lm-eval's batch shape)
                items = items.get("items", {})
            if items.get("type") == "integer":
                items["maximum"] = vocab_size - 1
        app.openapi_schema = doc
    return app.openapi_schema


def error_response(e: EngineError) -> JSONResponse:
    return envelope(KINDS.get(e.kind, (500, ""))[0], e.kind, e.message, e.param)


def internal(exc: BaseException, where: str) -> tuple[str, str]:
    """An unexpected error: logged under a fresh request id (`report_bug`); (id, the message the client gets)."""
    rid = report_bug(exc, where)
    return rid, f"internal error (request id {rid}; the server log has the details)"


def error_event(e: BaseException, where: str = "a stream") -> dict:
    """The SSE payload for an error in the middle of a stream."""
    if isinstance(e, EngineError):
        kind = e.kind
        return {"error": {"message": e.message, "type": KINDS.get(kind, (500, kind))[1], "param": e.param,
                          "code": CODES.get(kind, kind)}}
    _, message = internal(e, where)
    return {"error": {"message": message, "type": "internal_server_error", "param": None, "code": CODES["internal"]}}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x not in ("body",)]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    extra = f" ({len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{param + ': ' if param else ''}{msg}{extra}", param


def _methods_at(request: Request) -> list[str]:
    """Every method some route serves at this request's path."""
    from starlette.routing import Match

    methods: set[str] = set()
    for route in request.app.router.routes:
        scope = dict(request.scope, method="__none__")
        if route.matches(scope)[0] != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def install(app: FastAPI) -> None:
    """Register the exception handlers that produce the envelope."""

    @app.exception_handler(EngineError)
    async def _engine(request: Request, exc: EngineError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return envelope(400, "invalid", message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 401: "unauthorized", 413: "too_large"}.get(exc.status_code, "invalid")
        response = envelope(exc.status_code, kind, str(exc.detail))
        response.headers.update(exc.headers or {})  # e.g. Allow on a 405
        if exc.status_code == 405:  # Starlette names the first matching route's methods; a path may have several
            response.headers["Allow"] = ", ".join(_methods_at(request))
        return response

    @app.exception_handler(SaeloraError)
    async def _bad_input(request: Request, exc: SaeloraError) -> JSONResponse:
        # saelora's typed error for bad input or an unusable artifact named by the request; any other exception
        # (a ValueError included) is a bug: a 500 that never carries its text
        return envelope(400, "invalid", str(exc))

    @app.exception_handler(Exception)
    async def _other(request: Request, exc: Exception) -> JSONResponse:
        rid, message = internal(exc, request.url.path)
        response = envelope(500, "internal", message)
        response.headers["X-Request-Id"] = rid
        return response
