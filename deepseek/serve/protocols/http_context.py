"""What every HTTP route shares: the server's settings and manager, the API key check, and the one body reader.

    ctx = serving(request)                       # the ServingContext the app was built with
    ctx.authorize(request.headers)               # management routes: 403 without a server key, 401 without it
    body = parse_json_object(await ctx.read_body(request.headers, request.receive))

The lean infer path (not a FastAPI route) reads its body with the same :meth:`ServingContext.read_body`.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from typing import AbstractSet, Any, Awaitable, Callable, Mapping, Optional

import orjson
from fastapi import Request

from deepseek.serve.errors import (FORBIDDEN, TOO_LARGE, UNAUTHENTICATED, ModelNotFoundError, ModelUnavailableError,
                                   RequestError, error_kind)
from deepseek.serve.manager import ModelManager, ModelVersion
from deepseek.serve.metrics import ServingMetrics
from deepseek.serve.protocols.common import API_KEY_ENV, AccessLog, client_id, key_matches, presented_key

DEFAULT_ROUTING_HEADER = "X-User-Id"
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024

Receive = Callable[[], Awaitable[dict]]


class ClientGone(Exception):
    """The HTTP client went away before its answer was ready: nobody is left to answer."""


@dataclass
class ServingContext:
    """The settings and state the HTTP routes share (``app.state.serving``)."""

    manager: ModelManager
    metrics: ServingMetrics
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    api_key: Optional[str] = None
    protect_inference: bool = False
    access_log: Optional[AccessLog] = None
    routing_header: str = DEFAULT_ROUTING_HEADER.lower()  # lower case, as ASGI header names are
    started_at: float = field(default_factory=time.time)
    ready: bool = False  # set by the app's lifespan: models loaded and not shutting down

    def authorize(self, headers: Mapping[str, str]) -> None:
        """Management routes (and inference with ``protect_inference``) need the server's API key."""
        if not self.api_key:
            raise RequestError("the management API is disabled: start the server with --api-key "
                               f"(or set {API_KEY_ENV}) to enable it", FORBIDDEN)
        if not key_matches(self.api_key, presented_key(headers.get("authorization"), headers.get("x-api-key"))):
            raise RequestError("missing or wrong API key (send 'Authorization: Bearer KEY' or 'X-API-Key')",
                               UNAUTHENTICATED)

    def check_inference_key(self, headers: Mapping[str, str]) -> None:
        if self.protect_inference and self.api_key:
            self.authorize(headers)

    async def read_body(self, headers: Mapping[str, str], receive: Receive) -> bytes:
        """The whole request body, refused (413) past ``max_request_bytes`` before or while it arrives."""
        length = headers.get("content-length")
        if length is not None:
            if not is_decimal(length):
                raise RequestError(f"bad Content-Length {length!r}")
            if int(length) > self.max_request_bytes:
                raise RequestError(f"request body of {length} bytes exceeds the limit of "
                                   f"{self.max_request_bytes} bytes", TOO_LARGE)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_request_bytes:
                raise RequestError(f"request body exceeds the limit of {self.max_request_bytes} bytes", TOO_LARGE)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def serving(request: Request) -> ServingContext:
    """The :class:`ServingContext` of the app serving ``request``."""
    return request.app.state.serving


async def read_json_object(request: Request) -> dict:
    """A route's body as a JSON object (size-limited, then :func:`parse_json_object`)."""
    return parse_json_object(await serving(request).read_body(request.headers, request.receive))


async def read_inference_body(request: Request, fields: AbstractSet[str]) -> dict:
    """An inference route's body: the API key checked (with ``protect_inference``), then a JSON object holding
    only ``fields`` (:func:`refuse_unknown_fields`)."""
    serving(request).check_inference_key(request.headers)
    body = await read_json_object(request)
    refuse_unknown_fields(body, fields)
    return body


def refuse_unknown_fields(body: dict, allowed: AbstractSet[str]) -> None:
    """A 400 naming the first field of ``body`` not in ``allowed`` (OpenAI's wording), listing those allowed."""
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestError(f"Unrecognized request argument(s): {', '.join(unknown)}. "
                           f"Supported: {', '.join(sorted(allowed))}", param=unknown[0])


def parse_json_object(text: bytes) -> dict:
    """A request body that must be a JSON object; anything else is a 400 that says why."""
    try:
        data: Any = orjson.loads(text)
    except orjson.JSONDecodeError:
        try:  # strict JSON failed: the standard parser also takes NaN/Infinity and big integers, as Triton's does
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError(f"malformed JSON request: {exc}") from None
        except RecursionError:  # json's decoder recurses per nesting level: "[[[[..." is the client's fault
            raise RequestError("malformed JSON request: nested too deeply") from None
    if not isinstance(data, dict):
        raise RequestError("the request must be a JSON object")
    return data


def is_decimal(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also takes "²", which ``int`` refuses."""
    return text.isascii() and text.isdigit()


def parse_version(version: Optional[str]) -> Optional[int]:
    """A version path segment or field as a number (None: not given); 400 unless a positive integer."""
    if version is None or version == "":
        return None
    if not is_decimal(version) or int(version) < 1:
        raise RequestError(f"invalid model version {version!r}: must be a positive integer")
    return int(version)


def select_named_version(request: Request, model: str) -> tuple[ModelVersion, str]:
    """The version ``model`` (``name`` or ``name/version``, from a request body's ``model`` field) names, else the
    routing policy's choice for the request's routing header; and the name. A 400 for a bad version, 404 for an
    unknown model or version, 503 for one not ready, each naming the field ``model``."""
    name, _, version_text = model.partition("/")
    version = None
    if version_text:
        if not is_decimal(version_text) or int(version_text) < 1:
            raise RequestError(f"invalid model version in {model!r}", param="model")
        version = int(version_text)
    ctx = serving(request)
    try:
        mv, route = ctx.manager.select(name, version, request.headers.get(ctx.routing_header))
    except (ModelNotFoundError, ModelUnavailableError) as exc:  # 404 / 503, naming the field at fault
        request.state.access = {"model": name, "version": version}
        raise RequestError(str(exc), error_kind(exc), param="model") from None
    request.state.access = {"model": name, "version": mv.version, "variant": route.variant if route else None}
    return mv, name


# -- the access log of the routes that are FastAPI routes (OpenAI-shaped, retrieve, KServe generate) ----------------

def log_access(request: Request, route: str, started: float, status: Any, **fields: Any) -> None:
    """One access-log line for ``request`` (``started``: its ``time.monotonic()``), once; the model, version and
    variant :func:`select_named_version` chose, and the client (routing header, else the body's ``user``, else the
    peer address) are added."""
    ctx = serving(request)
    if ctx.access_log is None or getattr(request.state, "access_logged", False):
        return
    request.state.access_logged = True
    user = getattr(request.state, "access_user", None)
    client = client_id(request.headers.get(ctx.routing_header), user if isinstance(user, str) else None,
                       request.client.host if request.client else None)
    ctx.access_log.write(route=route, **getattr(request.state, "access", {}), status=status, client=client,
                         total_ms=round((time.monotonic() - started) * 1000, 3), **fields)


def access_logged(route: str):
    """Decorate a route so that a request it refuses (an exception) still gets its access-log line; the route logs
    its answered requests itself with :func:`log_access`, with the fields it knows."""
    def wrap(handler):
        @functools.wraps(handler)
        async def logged(*args: Any, **kwargs: Any):
            started = time.monotonic()
            try:
                return await handler(*args, **kwargs)
            except ClientGone:
                log_access(kwargs["request"], route, started, 499)
                raise
            except Exception as exc:
                log_access(kwargs["request"], route, started, error_kind(exc).http)
                raise
        return logged
    return wrap
