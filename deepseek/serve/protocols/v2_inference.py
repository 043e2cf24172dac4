"""KServe v2 inference over HTTP: server and model metadata, health, and the infer handler.

    GET  /v2                                              server metadata (name, version, extensions)
    GET  /v2/health/live | /v2/health/ready               the status code alone
    GET  /v2/models/{m}[/versions/{v}][/ready|/config|/stats], GET /v2/models/stats
    POST /v2/models/{m}[/versions/{v}]/infer              :func:`handle_infer`, a plain ASGI handler

Infer is the server's hot path, so it is not a FastAPI route: :class:`~deepseek.serve.protocols.http_v2.KServeApp`
hands it the ASGI call directly (FastAPI's routing and middleware cost more than the rest of a small request).
Its errors come from the same table (:mod:`deepseek.serve.errors`) as every route's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Optional

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from deepseek.serve.batching import RequestTrace
from deepseek.serve.errors import INTERNAL, RequestError, error_headers, error_kind, error_message
from deepseek.serve.manager import ModelVersion, triton_model_config
from deepseek.serve.protocols.common import EXTENSIONS, SERVER_NAME, client_id, request_options, server_version
from deepseek.serve.protocols.http_context import (ClientGone, ServingContext, is_decimal, parse_json_object,
                                                   parse_version, serving)
from deepseek.serve.protocols.http_errors import KServeRoute
from deepseek.serve.protocols.kserve_tensors import (HEADER_LENGTH, check_requested_outputs, encode_response,
                                                     parse_inputs)

log = logging.getLogger(__name__)

router = APIRouter(route_class=KServeRoute)


# -- server ------------------------------------------------------------------------------------------------

@router.get("/v2")
async def server_metadata():
    return {"name": SERVER_NAME, "version": server_version(), "extensions": EXTENSIONS}


@router.get("/v2/health/live")
async def live():
    return Response(status_code=200)


@router.get("/v2/health/ready")
async def ready(request: Request):
    ctx = serving(request)
    return Response(status_code=200 if ctx.ready and not ctx.manager.closing else 503)


# -- models ------------------------------------------------------------------------------------------------

def lookup(request: Request, model: str, version: Optional[str]) -> ModelVersion:
    """The version a metadata or health request means (no routing policy is consulted, nothing is counted)."""
    return serving(request).manager.get(model, parse_version(version))


@router.get("/v2/models/{model}")
@router.get("/v2/models/{model}/versions/{version}")
async def model_metadata(request: Request, model: str, version: Optional[str] = None):
    mv = lookup(request, model, version)
    meta = mv.backend.metadata()
    if version is None:
        meta["versions"] = [str(v) for v in serving(request).manager.ready_versions(model)]
    return meta


@router.get("/v2/models/{model}/ready")
@router.get("/v2/models/{model}/versions/{version}/ready")
async def model_ready(request: Request, model: str, version: Optional[str] = None):
    lookup(request, model, version)
    return Response(status_code=200)


@router.get("/v2/models/{model}/config")
@router.get("/v2/models/{model}/versions/{version}/config")
async def model_config(request: Request, model: str, version: Optional[str] = None):
    return triton_model_config(lookup(request, model, version))


@router.get("/v2/models/stats")
@router.get("/v2/models/{model}/stats")
@router.get("/v2/models/{model}/versions/{version}/stats")
async def model_stats(request: Request, model: Optional[str] = None, version: Optional[str] = None):
    return serving(request).manager.statistics(model, parse_version(version))


# -- infer -------------------------------------------------------------------------------------------------

async def handle_infer(ctx: ServingContext, scope: dict, receive, send, model: str, version: Optional[str]) -> None:
    """``POST /v2/models/{model}[/versions/{version}]/infer`` as a plain ASGI call (see module docs)."""
    started = time.perf_counter()
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    reached: list = []  # set once the request reaches a model version (which logs and counts it itself)
    try:
        payload, extra = await _infer(ctx, model, version, headers, receive, started, reached, scope.get("client"))
        status = 200
    except ClientGone:
        return  # nobody is left to answer
    except Exception as exc:
        status, payload, extra = error_kind(exc).http, orjson.dumps({"error": error_message(exc)}), error_headers(exc)
        if error_kind(exc) is INTERNAL and not isinstance(exc, RequestError):
            log.exception("infer on %s failed", model)
        if not reached:  # refused before any model: counted by status only (model names are the client's)
            ctx.metrics.observe_refused(str(status))
            if ctx.access_log is not None:
                peer = scope.get("client")
                ctx.access_log.write(route="v2/infer", model=model, version=version, status=status,
                                     client=client_id(headers.get(ctx.routing_header), peer=peer and peer[0]),
                                     total_ms=round((time.perf_counter() - started) * 1000, 3))
    content_type = b"application/octet-stream" if HEADER_LENGTH in extra else b"application/json"
    response_headers = [(b"content-type", content_type), (b"content-length", str(len(payload)).encode())]
    response_headers += [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in extra.items()]
    await send({"type": "http.response.start", "status": status, "headers": response_headers})
    await send({"type": "http.response.body", "body": payload})


def _split_binary(headers: dict, body: bytes) -> tuple[bytes, bytes]:
    """The JSON header and the binary tensor data of a body (``Inference-Header-Content-Length``)."""
    header_length = headers.get(HEADER_LENGTH.lower())
    if header_length is None:
        return body, b""
    if not is_decimal(header_length):
        raise RequestError(f"bad {HEADER_LENGTH} {header_length!r}")
    n = int(header_length)
    if not 0 < n <= len(body):
        raise RequestError(f"{HEADER_LENGTH} {n} does not fit the body of {len(body)} bytes")
    return body[:n], body[n:]


async def _infer(ctx: ServingContext, model: str, version: Optional[str], headers: dict, receive, started: float,
                 reached: list, peer: Optional[tuple] = None) -> tuple[bytes, dict]:
    ctx.check_inference_key(headers)
    text, binary = _split_binary(headers, await ctx.read_body(headers, receive))
    header = parse_json_object(text)
    if not isinstance(header.get("id", ""), str):  # echoed back: a string, as KServe defines it
        raise RequestError(f"'id' must be a string, got {type(header['id']).__name__}")
    try:
        timeout_ms, priority, key = request_options(header.get("parameters"))
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    mv, route = ctx.manager.select(model, parse_version(version), key or headers.get(ctx.routing_header))
    inputs = parse_inputs(header, binary)
    check_requested_outputs(header, mv.backend)
    status, trace = 200, RequestTrace()
    # Watch the connection while the request waits: a client that goes away cancels this task, and the
    # batcher then drops the request before it costs compute.
    me, gone = asyncio.current_task(), []

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.append(True)
        me.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    reached.append(True)
    try:
        outputs = await ctx.manager.run(mv, inputs, timeout_ms=timeout_ms, priority=priority, trace=trace)
    except asyncio.CancelledError:
        if not gone:
            raise
        me.uncancel()
        status = 499  # nginx's "client closed request"
        raise ClientGone() from None
    except Exception as exc:
        status = error_kind(exc).http
        if status == 500:  # the model itself failed: 500 for this request, and the server goes on
            log.exception("model %s version %s failed", model, mv.version)
            raise RequestError(f"model {model!r} failed: {exc}", INTERNAL) from None
        raise
    finally:
        watcher.cancel()
        if ctx.access_log is not None:
            compute_ns = trace.compute_input_ns + trace.compute_infer_ns + trace.compute_output_ns
            ctx.access_log.write(route="v2/infer", model=model, version=mv.version, status=status,
                                 id=header.get("id"),
                                 client=client_id(key or headers.get(ctx.routing_header), peer=peer and peer[0]),
                                 variant=route.variant if route else None, queue_ms=round(trace.queue_ns / 1e6, 3),
                                 compute_ms=round(compute_ns / 1e6, 3), batch_size=trace.batch_size,
                                 total_ms=round((time.perf_counter() - started) * 1000, 3))
    variant = route.variant if route is not None else None
    payload, json_length = encode_response(header, model, mv.version, outputs,
                                           {"routing_variant": variant} if variant else None)
    extra = {} if json_length is None else {HEADER_LENGTH: json_length}
    if variant:
        extra["X-Routing-Variant"] = variant
    return payload, extra
