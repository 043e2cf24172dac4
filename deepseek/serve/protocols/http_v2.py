"""The HTTP app of ``ds serve``: KServe v2 (Open Inference Protocol) as Triton serves it, OpenAI's API, metrics and
the playground, over a :class:`ModelManager`. This module assembles it; the routes live in one module per protocol:

    protocols/v2_inference.py    /v2, health, model metadata/ready/config/stats, infer (a plain ASGI handler)
    protocols/v2_management.py   repository index, load/unload, routing policies, A/B experiments
    protocols/openai_api.py      /v1/models, /v1/completions, /v1/chat/completions, v2 generate[_stream]
    protocols/openai_embeddings.py  /v1/embeddings (embedding models, through the dynamic batcher)
    protocols/retrieval.py       /v1/retrieve (knowledge indexes; queries embedded through the dynamic batcher)
    protocols/prometheus.py      /metrics
    playground/                  / and /playground/*


    app = create_app(ModelManager(ModelRepository("models/")))
    uvicorn.run(app, port=8000)

Routes: ``GET /v2``, ``GET /v2/health/{live,ready}``, ``GET /v2/models/{m}[/versions/{v}][/ready|/config|/stats]``,
``GET /v2/models/stats``, ``POST /v2/models/{m}[/versions/{v}]/infer``, ``POST /v2/repository/index``,
``GET /metrics`` (Prometheus). Infer takes JSON tensors (``data`` flat or nested, row-major) and the binary
tensor extension (``Inference-Header-Content-Length``; the default of ``tritonclient.http``); outputs come
back as JSON, or binary when asked for with ``binary_data`` / ``binary_data_output``. Request parameters
``timeout`` (µs), ``priority`` and ``routing_key`` (or the ``X-User-Id`` header) are honoured. A client that
disconnects while its request waits is dropped from the queue before it costs compute.

Management routes need the API key (``Authorization: Bearer KEY`` or ``X-API-Key``; 401 without it, 403
when the server has none): ``POST /v2/repository/models/{m}/load|unload`` (``--model-control explicit``),
``GET|PUT|DELETE /v2/models/{m}/routing`` (pinned / weighted canary / A/B policy),
``GET /v2/models/{m}/experiment`` (the A/B report) and ``POST /v2/models/{m}/experiment/outcome``.

Errors are ``{"error": "..."}`` (OpenAI's routes: OpenAI's shape) with the status :mod:`deepseek.serve.errors`
gives: 400 malformed request or invalid inputs, 401/403 management without the key, 404 unknown
model/version/route, 413 body over ``max_request_bytes`` (with ``Connection: close``: the rest of the body is
not read), 429 (``Retry-After: 1``) queue full, 503 not ready or shutting down, 504 deadline exceeded, 500 a
model failure or a bug, answered on a connection that stays open. Health answers are the status code alone.
The server is ready
once the app has started (models loaded) and until it shuts down; a broken model does not make it unready.
The app's lifespan loads the repository on startup (unless already loaded) and drains it on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from typing import Awaitable, Callable, Optional

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepseek.serve.errors import INVALID, NOT_FOUND, ErrorKind, RequestError
from deepseek.serve.manager import ModelManager
from deepseek.serve.metrics import ServingMetrics
from deepseek.serve.playground import register_playground
from deepseek.serve.protocols import (openai_api, openai_embeddings, prometheus, retrieval, v2_inference,
                                      v2_management)
from deepseek.serve.protocols.common import AccessLog
from deepseek.serve.protocols.http_context import (DEFAULT_MAX_REQUEST_BYTES, DEFAULT_ROUTING_HEADER,
                                                   ServingContext)
from deepseek.serve.protocols.http_errors import kserve_error, openai_error

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "DEFAULT_ROUTING_HEADER", "KServeApp", "create_app"]


def create_app(manager: ModelManager, *, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               api_key: Optional[str] = None, protect_inference: bool = False,
               metrics: Optional[ServingMetrics] = None, access_log: Optional[AccessLog] = None,
               routing_header: str = DEFAULT_ROUTING_HEADER, poll_interval_s: float = 15.0,
               on_startup: Optional[Callable[[], Awaitable[None]]] = None,
               on_shutdown: Optional[Callable[[], Awaitable[None]]] = None) -> "KServeApp":
    """The HTTP app over ``manager`` (see module docs).

    ``api_key`` guards the management routes (and inference too with ``protect_inference``); without a key
    they answer 403. ``on_startup`` / ``on_shutdown`` run inside the lifespan (the gRPC server uses them)."""
    if metrics is None:
        metrics = manager.metrics or ServingMetrics(manager)
    manager.metrics = metrics
    ctx = ServingContext(manager, metrics, max_request_bytes=max_request_bytes, api_key=api_key,
                         protect_inference=protect_inference, access_log=access_log,
                         routing_header=routing_header.lower())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if not manager.loaded:
            await manager.load_all()
        poller = None
        if manager.control_mode == "poll":
            poller = asyncio.get_running_loop().create_task(manager.poll_forever(poll_interval_s))
        if on_startup is not None:
            await on_startup()
        # Everything loaded so far (torch, FastAPI, the models: ~10^6 objects) lives for the whole run; moved out
        # of the collector's reach, the periodic full collections no longer stall the event loop (p99 of the
        # compute-bound benchmark at 64 clients: ~290-330 ms -> ~200 ms).
        gc.collect()
        gc.freeze()
        ctx.ready = True
        try:
            yield
        finally:
            ctx.ready = False
            if poller is not None:
                poller.cancel()
            if on_shutdown is not None:
                await on_shutdown()
            await manager.close()  # drain: queued and running requests finish first

    app = FastAPI(title="deepseek KServe v2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serving = ctx
    app.state.manager, app.state.metrics, app.state.started_at = manager, metrics, ctx.started_at
    app.add_exception_handler(StarletteHTTPException, answer_http_exception)
    app.add_exception_handler(RequestValidationError, answer_validation_error)
    for router in (v2_inference.router, v2_management.router, openai_api.router, openai_embeddings.router,
                   retrieval.router, prometheus.router):
        app.include_router(router)
    register_playground(app)
    return KServeApp(app, ctx)


def _error_shape(request: Request):
    return openai_error if request.url.path.startswith("/v1/") else kserve_error


async def answer_http_exception(request: Request, exc: StarletteHTTPException) -> Response:
    """FastAPI's own 404 (no such route) and 405 (wrong method), in the protocol's error shape."""
    return _error_shape(request)(RequestError(str(exc.detail), _kind_of_status(exc.status_code)))


async def answer_validation_error(request: Request, exc: RequestValidationError) -> Response:
    return _error_shape(request)(RequestError(f"invalid request: {exc.errors()}"))


def _kind_of_status(status: int) -> ErrorKind:
    return {400: INVALID, 404: NOT_FOUND}.get(status) or ErrorKind(status, "INVALID_ARGUMENT", "invalid_request_error")


class KServeApp:
    """The ASGI app: ``POST /v2/models/{m}[/versions/{v}]/infer`` goes straight to
    :func:`~deepseek.serve.protocols.v2_inference.handle_infer`, everything else to FastAPI.

    It is also the last guard of the connection: an exception that escapes FastAPI after its answer was sent
    whole (Starlette's last-resort handler answers 500 and then re-raises) is logged here and not passed on,
    so uvicorn keeps the keep-alive connection instead of dropping it unannounced."""

    def __init__(self, app: FastAPI, ctx: ServingContext):
        self.app, self.ctx = app, ctx

    def __getattr__(self, name: str):  # .state, .routes, ... of the FastAPI app
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] == "POST":
            path = scope["path"]
            if path.startswith("/v2/models/") and path.endswith("/infer"):
                parts = path[11:-6].split("/")
                if len(parts) == 1 and parts[0]:
                    return await v2_inference.handle_infer(self.ctx, scope, receive, send, parts[0], None)
                if len(parts) == 3 and parts[0] and parts[1] == "versions":
                    return await v2_inference.handle_infer(self.ctx, scope, receive, send, parts[0], parts[2])
        progress = {"started": False, "finished": False}

        async def tracking_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                progress["started"] = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                progress["finished"] = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if progress["started"] and not progress["finished"]:
                raise  # a stream broke off mid-answer: only closing the connection can tell the client
            log.exception("%s %s failed", scope["method"], scope["path"])
            if not progress["started"]:
                body = orjson.dumps({"error": f"internal error: {exc}"})
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
