"""saelora.clients: typed clients for a saelora server (httpx + pydantic, no torch)."""

from .client import AsyncSaeloraClient, Edit, SaeloraClient
from .errors import (AuthenticationError, ConflictError, ContextLengthError, InternalServerError, InvalidRequestError,
                     NotFoundError, PermissionDeniedError, RateLimitError, SaeloraAPIError, ServiceUnavailableError)

__all__ = ["SaeloraClient", "AsyncSaeloraClient", "Edit", "SaeloraAPIError", "InvalidRequestError",
           "ContextLengthError",
           "AuthenticationError", "PermissionDeniedError", "NotFoundError", "ConflictError", "RateLimitError",
           "ServiceUnavailableError", "InternalServerError"]
