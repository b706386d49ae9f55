"""One exception class per server error type (the `type` of the OpenAI error envelope)."""

from __future__ import annotations

from typing import Any


class SaeloraAPIError(Exception):
    """An error response from a saelora server."""

    def __init__(self, status: int, message: str, type: str = "", param: str | None = None,
                 body: Any = None) -> None:
        super().__init__(f"{status} {type}: {message}")
        self.status, self.message, self.type, self.param, self.body = status, message, type, param, body


class InvalidRequestError(SaeloraAPIError):
    """400 / 413: the request was malformed or out of bounds."""


class ContextLengthError(InvalidRequestError):
    """400 with code "context_length_exceeded": prompt + max_tokens is over the model's context."""


class AuthenticationError(SaeloraAPIError):
    """401: missing or wrong API key."""


class PermissionDeniedError(SaeloraAPIError):
    """403: the key given may not do this (adapter management needs the admin key)."""


class NotFoundError(SaeloraAPIError):
    """404: unknown model, adapter, SAE or route."""


class ConflictError(SaeloraAPIError):
    """409: adapter name taken, or adapter in use."""


class RateLimitError(SaeloraAPIError):
    """429: the server's queue is full (retried with backoff)."""


class ServiceUnavailableError(SaeloraAPIError):
    """503: the model is not loaded yet (retried with backoff)."""


class RequestTimeoutError(SaeloraAPIError):
    """504: the request ran past the server's --request-timeout (its row was dropped)."""


class InternalServerError(SaeloraAPIError):
    """500: a bug on the server."""


BY_TYPE = {"invalid_request_error": InvalidRequestError, "authentication_error": AuthenticationError,
           "permission_error": PermissionDeniedError,
           "not_found_error": NotFoundError, "conflict_error": ConflictError, "rate_limit_error": RateLimitError,
           "service_unavailable_error": ServiceUnavailableError, "internal_server_error": InternalServerError,
           "timeout_error": RequestTimeoutError}
BY_STATUS = {400: InvalidRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
             409: ConflictError, 413: InvalidRequestError, 429: RateLimitError, 503: ServiceUnavailableError,
             500: InternalServerError, 504: RequestTimeoutError}


def status_of(err: dict) -> int:
    """The HTTP status an error event stands for (a stream's errors come after its 200): from the error's type."""
    by_type = {cls: status for status, cls in BY_STATUS.items() if status != 413}
    return by_type.get(BY_TYPE.get(err.get("type", ""), InternalServerError), 500)


def from_response(status: int, body: Any) -> SaeloraAPIError:
    err = body.get("error", {}) if isinstance(body, dict) else {}
    cls = BY_TYPE.get(err.get("type", ""), BY_STATUS.get(status, SaeloraAPIError))
    if err.get("code") == "context_length_exceeded":
        cls = ContextLengthError
    return cls(status, err.get("message") or str(body), err.get("type", ""), err.get("param"), body)
