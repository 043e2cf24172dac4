"""One table from the library's exceptions to what every front end answers: HTTP status, gRPC code, OpenAI type.

    kind = error_kind(exc)              # e.g. QUEUE_FULL: 429 + Retry-After, RESOURCE_EXHAUSTED, rate_limit_error
    raise RequestError("'stop' must be a string", param="stop")     # a client's mistake: 400 on every protocol
    raise RequestError(f"unknown model {name!r}", NOT_FOUND)

A request is refused by raising: :class:`RequestError` for what the front ends check themselves, or one of the
library's exceptions (the model manager's, the batcher's, the generation engine's), which :data:`EXCEPTION_KINDS`
maps. Every ``ValueError`` is the request's fault (the backends validate inputs with it, ConfigError is one), so
any client mistake the table does not name explicitly still lands on 400; only an exception outside the table
(a model that failed, a bug) is a 500, and the front ends answer it without dropping the connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from deepseek.errors import QueueFullError
from deepseek.generate.continuous import EngineStoppedError
from deepseek.serve.batching import BatcherClosedError, DeadlineExceededError


@dataclass(frozen=True)
class ErrorKind:
    """How one kind of refusal is answered on each protocol."""

    http: int
    grpc: str  # a grpc.StatusCode name (grpc itself is imported by the gRPC front end only)
    openai: str  # the OpenAI error ``type``
    headers: tuple[tuple[str, str], ...] = ()  # HTTP headers that go with it


INVALID = ErrorKind(400, "INVALID_ARGUMENT", "invalid_request_error")
PRECONDITION = ErrorKind(400, "FAILED_PRECONDITION", "invalid_request_error")
UNAUTHENTICATED = ErrorKind(401, "UNAUTHENTICATED", "authentication_error", (("WWW-Authenticate", "Bearer"),))
FORBIDDEN = ErrorKind(403, "PERMISSION_DENIED", "permission_error")
NOT_FOUND = ErrorKind(404, "NOT_FOUND", "not_found_error")
# The rest of an oversized body is never read: the connection cannot carry another request, and says so.
TOO_LARGE = ErrorKind(413, "RESOURCE_EXHAUSTED", "invalid_request_error", (("Connection", "close"),))
QUEUE_FULL = ErrorKind(429, "RESOURCE_EXHAUSTED", "rate_limit_error", (("Retry-After", "1"),))
INTERNAL = ErrorKind(500, "INTERNAL", "server_error")
UNAVAILABLE = ErrorKind(503, "UNAVAILABLE", "server_error")
DEADLINE = ErrorKind(504, "DEADLINE_EXCEEDED", "server_error")


class ModelNotFoundError(LookupError):
    """No such model or version in the repository (HTTP 404)."""


class ModelUnavailableError(RuntimeError):
    """The model or version exists but is not ready, or the server is closing (HTTP 503)."""


class ModelLoadError(ValueError):
    """A load request after which no version of the model is READY (HTTP 400, gRPC INVALID_ARGUMENT)."""


class ControlModeError(RuntimeError):
    """A load/unload request the model-control mode does not allow (HTTP 400, gRPC FAILED_PRECONDITION)."""


class RequestError(Exception):
    """A request the front end refuses: ``kind`` (default 400), and ``param``, the field at fault (OpenAI's)."""

    def __init__(self, message: str, kind: ErrorKind = INVALID, *, param: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.message, self.kind, self.param = message, kind, param
        self.headers = {**dict(kind.headers), **(headers or {})}


# First match wins: DeadlineExceededError is a TimeoutError, ModelLoadError and ConfigError are ValueErrors.
EXCEPTION_KINDS: tuple[tuple[type | tuple[type, ...], ErrorKind], ...] = (
    (ModelNotFoundError, NOT_FOUND),
    (QueueFullError, QUEUE_FULL),
    (DeadlineExceededError, DEADLINE),
    ((ModelUnavailableError, BatcherClosedError, EngineStoppedError), UNAVAILABLE),
    (ControlModeError, PRECONDITION),
    (ValueError, INVALID),
)


def error_kind(exc: BaseException) -> ErrorKind:
    """How ``exc`` is answered: its own kind for a :class:`RequestError`, the table's, else INTERNAL."""
    if isinstance(exc, RequestError):
        return exc.kind
    for types, kind in EXCEPTION_KINDS:
        if isinstance(exc, types):
            return kind
    return INTERNAL


def error_message(exc: BaseException) -> str:
    """The message a client reads; an internal error says so (the traceback goes to the server's log)."""
    if isinstance(exc, RequestError):
        return exc.message
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)  # a KeyError's str() is a repr
    text = str(text) or type(exc).__name__
    return f"internal error: {text}" if error_kind(exc) is INTERNAL else text


def error_headers(exc: BaseException) -> dict[str, str]:
    """The HTTP headers that go with the answer to ``exc`` (Retry-After, WWW-Authenticate, Connection)."""
    return exc.headers if isinstance(exc, RequestError) else dict(error_kind(exc).headers)
