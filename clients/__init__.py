"""saelora.clients: typed clients for a saelora server (httpx + pydantic, no torch)."""

from .client import AsyncSaeloraClient, Edit, SaeloraClient, Vector
from .errors import (AuthenticationError, ConflictError, ContextLengthError, InternalServerError, InvalidRequestError,
                     NotFoundError, PermissionDeniedError, RateLimitError, RequestTimeoutError, SaeloraAPIError,
                     ServiceUnavailableError)

__all__ = ["SaeloraClient", "AsyncSaeloraClient", "Edit", "Vector", "SaeloraAPIError", "InvalidRequestError",
           "ContextLengthError",
           "AuthenticationError", "PermissionDeniedError", "NotFoundError", "ConflictError", "RateLimitError",
           "ServiceUnavailableError", "InternalServerError", "RequestTimeoutError"]
