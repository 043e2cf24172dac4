"""The KServe v2 (Open Inference Protocol) REST front end, as Triton serves it, over a :class:`ModelManager`.

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

Errors are ``{"error": "..."}``: 400 malformed request or invalid inputs, 401/403 management without the
key, 404 unknown model/version/route, 413 body over ``max_request_bytes``, 429 (``Retry-After: 1``) queue
full, 503 not ready or shutting down, 504 deadline exceeded, 500 a model failure. Health answers are the status code alone. The server is ready
once the app has started (models loaded) and until it shuts down; a broken model does not make it unready.
The app's lifespan loads the repository on startup (unless already loaded) and drains it on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
import time
from typing import Any, Awaitable, Callable, Mapping, Optional

import numpy as np
import orjson
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepseek.config import ConfigError
from deepseek.serve.batching import BatcherClosedError, DeadlineExceededError, QueueFullError, RequestTrace
from deepseek.serve.config import DATATYPE_TO_TORCH
from deepseek.serve.manager import (ControlModeError, ModelLoadError, ModelManager, ModelNotFoundError,
                                    ModelUnavailableError, triton_model_config)
from deepseek.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from deepseek.serve.metrics import ServingMetrics
from deepseek.serve.playground import register_playground
from deepseek.serve.protocols.common import (API_KEY_ENV, EXTENSIONS, SERVER_NAME, AccessLog, key_matches,
                                             kserve_datatype, presented_key, request_options, server_version,
                                             tensor_bytes)
from deepseek.serve.protocols.openai_api import register_openai
from deepseek.serve.routing import ABTest, parse_policy

log = logging.getLogger(__name__)

DEFAULT_ROUTING_HEADER = "X-User-Id"
HEADER_LENGTH = "Inference-Header-Content-Length"
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024


class ProtocolError(Exception):
    """An error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def _error(status: int, message: str, headers: Optional[dict[str, str]] = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# -- tensors in and out ---------------------------------------------------------------------------------

def _flatten(data: Any) -> list:
    if not isinstance(data, list):
        return [data]
    flat: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _shape(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in value):
        raise ProtocolError(400, f"{where}: shape must be a list of non-negative integers, got {value!r}")
    return value


def _dtype(datatype: Any, where: str) -> torch.dtype:
    if not isinstance(datatype, str) or datatype not in DATATYPE_TO_TORCH:  # a JSON list/object is unhashable
        raise ProtocolError(400, f"{where}: unknown datatype {datatype!r}")
    dtype = DATATYPE_TO_TORCH[datatype]
    if dtype is None:
        raise ProtocolError(400, f"{where}: datatype {datatype} is not supported")
    return dtype


_NUMPY_DTYPES = {torch.bool: np.bool_, torch.uint8: np.uint8, torch.uint16: np.uint16, torch.uint32: np.uint32,
                 torch.uint64: np.uint64, torch.int8: np.int8, torch.int16: np.int16, torch.int32: np.int32,
                 torch.int64: np.int64, torch.float16: np.float16, torch.float32: np.float32,
                 torch.float64: np.float64}


# dtypes orjson writes straight from a numpy array
_JSON_NUMPY = {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float32, torch.float64}


def _tensor_from_json(data: Any, dtype: torch.dtype, shape: list[int], numel: int, where: str,
                      datatype: str) -> torch.Tensor:
    """A tensor from JSON ``data`` (flat or nested, row-major); ProtocolError(400) when it does not fit."""
    np_dtype = _NUMPY_DTYPES.get(dtype)
    if np_dtype is None or not isinstance(data, list):  # BF16 (numpy has none) and scalars: torch's own path
        flat = _flatten(data)
        if len(flat) != numel:
            raise ProtocolError(400, f"{where}: shape {shape} needs {numel} elements, data has {len(flat)}")
        try:  # the reshape too: torch reads a string element as a sequence ("" -> no elements at all)
            return torch.tensor(flat, dtype=dtype).reshape(shape)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise ProtocolError(400, f"{where}: data does not fit {datatype}: {exc}") from None
    try:
        if np_dtype in (np.float16, np.float32, np.float64):
            # Inferred first so that null or a string is refused instead of becoming NaN.
            array = np.asarray(data)
            if array.dtype.kind not in "biuf":
                raise ValueError("elements must be numbers")
            array = array.astype(np_dtype, copy=False)
        else:
            array = np.asarray(data, dtype=np_dtype)  # ints out of range and non-numbers raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(400, f"{where}: data does not fit {datatype} (ragged, or not numbers): {exc}") from None
    if array.size != numel:
        raise ProtocolError(400, f"{where}: shape {shape} needs {numel} elements, data has {array.size}")
    return torch.from_numpy(array.reshape(shape))


def parse_inputs(header: dict, binary: bytes) -> dict[str, torch.Tensor]:
    """The request's input tensors; ProtocolError(400) for anything malformed."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError(400, "request needs a non-empty 'inputs' list")
    tensors: dict[str, torch.Tensor] = {}
    offset = 0
    for i, spec in enumerate(inputs):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ProtocolError(400, f"inputs[{i}] must be an object with a 'name'")
        name = spec["name"]
        where = f"input {name!r}"
        if name in tensors:
            raise ProtocolError(400, f"{where} is given twice")
        shape = _shape(spec.get("shape"), where)
        dtype = _dtype(spec.get("datatype"), where)
        numel = math.prod(shape)
        params = spec.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise ProtocolError(400, f"{where}: binary_data_size {size!r} exceeds the binary data sent")
            itemsize = torch.empty((), dtype=dtype).element_size()
            if size != numel * itemsize:
                raise ProtocolError(400, f"{where}: {size} bytes of binary data do not fit shape {shape} "
                                         f"of {spec['datatype']} ({numel * itemsize} bytes)")
            chunk = bytearray(binary[offset:offset + size])
            offset += size
            tensor = (torch.frombuffer(chunk, dtype=dtype) if size else torch.empty(0, dtype=dtype)).reshape(shape)
        else:
            if "data" not in spec:
                raise ProtocolError(400, f"{where} has no 'data' (and no binary_data_size)")
            tensor = _tensor_from_json(spec["data"], dtype, shape, numel, where, spec["datatype"])
        tensors[name] = tensor
    if offset != len(binary):
        raise ProtocolError(400, f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    return tensors


def encode_response(header: dict, model: str, version: Optional[int], outputs: dict[str, torch.Tensor],
                    parameters: Optional[dict] = None) -> tuple[bytes, Optional[int]]:
    """The infer response body and, when it carries binary tensors (the request asked for binary outputs),
    the length of its JSON part (the ``Inference-Header-Content-Length``)."""
    requested = header.get("outputs")
    params = header.get("parameters") if isinstance(header.get("parameters"), dict) else {}
    default_binary = bool(params.get("binary_data_output", False))
    if requested is None:
        selected = [(name, default_binary) for name in outputs]
    else:
        if not isinstance(requested, list):
            raise ProtocolError(400, "'outputs' must be a list")
        selected = []
        for i, out in enumerate(requested):
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise ProtocolError(400, f"outputs[{i}] must be an object with a 'name'")
            if out["name"] not in outputs:
                raise ProtocolError(400, f"unknown output {out['name']!r}; the model has {', '.join(outputs)}")
            p = out.get("parameters") if isinstance(out.get("parameters"), dict) else {}
            selected.append((out["name"], bool(p.get("binary_data", default_binary))))
    body: dict[str, Any] = {"model_name": model, "model_version": "" if version is None else str(version)}
    if "id" in header:
        body["id"] = header["id"]
    if parameters:
        body["parameters"] = parameters
    blobs, items, finite = [], [], True
    for name, binary in selected:
        t = outputs[name]
        item: dict[str, Any] = {"name": name, "datatype": kserve_datatype(t.dtype), "shape": list(t.shape)}
        if binary:
            blob = tensor_bytes(t)
            item["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif t.dtype in _JSON_NUMPY and t.device.type == "cpu":  # numpy: no torch op per output (~10 µs each)
            array = (t.detach() if t.requires_grad else t).numpy().reshape(-1)
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                finite = False
            item["data"] = array
        else:
            t = t.detach().cpu().reshape(-1)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                finite = False
            item["data"] = t.tolist()
        items.append(item)
    body["outputs"] = items
    if finite:
        text = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    else:  # NaN/Infinity as Triton writes them (orjson would write null)
        text = json.dumps(body, allow_nan=True, default=lambda a: a.tolist()).encode()
    if not blobs:
        return text, None
    return text + b"".join(blobs), len(text)


# -- the app -----------------------------------------------------------------------------------------------

def parse_json_object(text: bytes) -> dict:
    """A request body that must be a JSON object; anything else is a 400 that says why."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        try:  # strict JSON failed: the standard parser also takes NaN/Infinity, as Triton's does
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError(400, f"malformed JSON request: {exc}") from None
        except RecursionError:  # json's decoder recurses per nesting level: "[[[[..." is the client's fault
            raise ProtocolError(400, "malformed JSON request: nested too deeply") from None
    if not isinstance(data, dict):
        raise ProtocolError(400, "the request must be a JSON object")
    return data


def create_app(manager: ModelManager, *, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               api_key: Optional[str] = None, protect_inference: bool = False,
               metrics: Optional[ServingMetrics] = None, access_log: Optional[AccessLog] = None,
               routing_header: str = DEFAULT_ROUTING_HEADER, poll_interval_s: float = 15.0,
               on_startup: Optional[Callable[[], Awaitable[None]]] = None,
               on_shutdown: Optional[Callable[[], Awaitable[None]]] = None) -> "KServeApp":
    """The KServe v2 REST app over ``manager`` (see module docs).

    ``api_key`` guards the management routes (and inference too with ``protect_inference``); without a key
    they answer 403. ``on_startup`` / ``on_shutdown`` run inside the lifespan (the gRPC server uses them)."""
    state = {"ready": False}
    if metrics is None:
        metrics = manager.metrics or ServingMetrics(manager)
    manager.metrics = metrics
    routing_header = routing_header.lower()

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
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            if poller is not None:
                poller.cancel()
            if on_shutdown is not None:
                await on_shutdown()
            await manager.close()  # drain: queued and running requests finish first

    app = FastAPI(title="deepseek KServe v2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.manager = manager
    app.state.metrics = metrics
    app.state.started_at = time.time()

    @app.exception_handler(ProtocolError)
    async def _protocol_error(request: Request, exc: ProtocolError):
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return _error(400, f"invalid request: {exc.errors()}")

    def authorize(request: Request) -> None:
        authorize_headers(request.headers)

    def authorize_headers(headers: Mapping[str, str]) -> None:
        if not api_key:
            raise ProtocolError(403, "the management API is disabled: start the server with --api-key "
                                     f"(or set {API_KEY_ENV}) to enable it")
        presented = presented_key(headers.get("authorization"), headers.get("x-api-key"))
        if not key_matches(api_key, presented):
            raise ProtocolError(401, "missing or wrong API key (send 'Authorization: Bearer KEY' or 'X-API-Key')",
                                {"WWW-Authenticate": "Bearer"})

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                raise ProtocolError(400, f"bad Content-Length {length!r}") from None
            if declared > max_request_bytes:
                raise ProtocolError(413, f"request body of {declared} bytes exceeds the limit of "
                                         f"{max_request_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_request_bytes:
                raise ProtocolError(413, f"request body exceeds the limit of {max_request_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def parse_version(version: Optional[str]) -> Optional[int]:
        if version is None or version == "":
            return None
        if not version.isdigit() or int(version) < 1:
            raise ProtocolError(400, f"invalid model version {version!r}: must be a positive integer")
        return int(version)

    def lookup(model: str, version: Optional[str]):
        """The version a metadata/health request means (no routing policy involved)."""
        try:
            return manager.get(model, parse_version(version))
        except ModelNotFoundError as exc:
            raise ProtocolError(404, str(exc)) from None
        except ModelUnavailableError as exc:
            raise ProtocolError(503, str(exc)) from None

    def choose_version(model: str, version: Optional[str], key: Optional[str]):
        """The version an inference request goes to: the named one, else the routing policy's choice."""
        try:
            return manager.select(model, parse_version(version), key)
        except ModelNotFoundError as exc:
            raise ProtocolError(404, str(exc)) from None
        except ModelUnavailableError as exc:
            raise ProtocolError(503, str(exc)) from None

    # -- server ------------------------------------------------------------------------------------------

    @app.get("/v2")
    async def server_metadata():
        return {"name": SERVER_NAME, "version": server_version(), "extensions": EXTENSIONS}

    @app.get("/v2/health/live")
    async def live():
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready():
        return Response(status_code=200 if state["ready"] and not manager.closing else 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    # -- models ------------------------------------------------------------------------------------------

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    async def model_metadata(model: str, version: Optional[str] = None):
        mv = lookup(model, version)
        meta = mv.backend.metadata()
        if version is None:
            meta["versions"] = [str(v) for v, m in sorted(manager.versions(model).items(), key=lambda kv: kv[0] or 0)
                                if v is not None and m.ready]
        return meta

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(model: str, version: Optional[str] = None):
        lookup(model, version)
        return Response(status_code=200)

    @app.get("/v2/models/{model}/config")
    @app.get("/v2/models/{model}/versions/{version}/config")
    async def model_config(model: str, version: Optional[str] = None):
        return triton_model_config(lookup(model, version))

    @app.get("/v2/models/stats")
    @app.get("/v2/models/{model}/stats")
    @app.get("/v2/models/{model}/versions/{version}/stats")
    async def model_stats(model: Optional[str] = None, version: Optional[str] = None):
        try:
            return manager.statistics(model, parse_version(version))
        except ModelNotFoundError as exc:
            raise ProtocolError(404, str(exc)) from None

    # -- infer: a lean ASGI path (see KServeApp), the hot path of the server ----------------------------------

    async def infer(scope: dict, receive, send, model: str, version: Optional[str]) -> None:
        started = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        reached: list = []  # set once the request reaches a model version (which logs and counts it itself)
        try:
            status, payload, extra = await _infer(model, version, headers, receive, started, reached)
        except ProtocolError as exc:
            status, payload, extra = exc.status, orjson.dumps({"error": exc.message}), exc.headers or {}
            if not reached:  # refused before any model: counted by status only (model names are the client's)
                metrics.observe_refused(str(status))
                if access_log is not None:
                    access_log.write(model=model, version=version, status=status,
                                     total_ms=round((time.perf_counter() - started) * 1000, 3))
        except _ClientGone:
            return  # nobody is left to answer
        except Exception as exc:  # noqa: BLE001 - a bug must cost one request a 500, never the server
            log.exception("infer on %s failed", model)
            status, payload, extra = 500, orjson.dumps({"error": f"internal error: {exc}"}), {}
        content_type = b"application/json"
        if HEADER_LENGTH in extra:
            content_type = b"application/octet-stream"
        response_headers = [(b"content-type", content_type), (b"content-length", str(len(payload)).encode())]
        response_headers += [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in extra.items()]
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": payload})

    async def _read(headers: dict, receive) -> bytes:
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise ProtocolError(400, f"bad Content-Length {length!r}")
            if int(length) > max_request_bytes:
                raise ProtocolError(413, f"request body of {length} bytes exceeds the limit of "
                                         f"{max_request_bytes} bytes")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > max_request_bytes:
                raise ProtocolError(413, f"request body exceeds the limit of {max_request_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _infer(model: str, version: Optional[str], headers: dict, receive, started: float,
                     reached: list) -> tuple[int, bytes, dict]:
        if protect_inference and api_key:
            authorize_headers(headers)
        body = await _read(headers, receive)
        header_length = headers.get(HEADER_LENGTH.lower())
        if header_length is not None:
            if not header_length.isdigit():
                raise ProtocolError(400, f"bad {HEADER_LENGTH} {header_length!r}")
            n = int(header_length)
            if not 0 < n <= len(body):
                raise ProtocolError(400, f"{HEADER_LENGTH} {n} does not fit the body of {len(body)} bytes")
            text, binary = body[:n], body[n:]
        else:
            text, binary = body, b""
        header = parse_json_object(text)
        try:
            timeout_ms, priority, key = request_options(header.get("parameters"))
        except ValueError as exc:
            raise ProtocolError(400, str(exc)) from None
        mv, route = choose_version(model, version, key or headers.get(routing_header))
        inputs = parse_inputs(header, binary)
        _check_requested_outputs(header, mv.backend)
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
            outputs = await manager.run(mv, inputs, timeout_ms=timeout_ms, priority=priority, trace=trace)
        except asyncio.CancelledError:
            if not gone:
                raise
            me.uncancel()
            status = 499  # nginx's "client closed request"
            raise _ClientGone() from None
        except ValueError as exc:
            status = 400
            raise ProtocolError(400, str(exc)) from None
        except QueueFullError as exc:
            status = 429
            raise ProtocolError(429, str(exc), {"Retry-After": "1"}) from None
        except DeadlineExceededError as exc:
            status = 504
            raise ProtocolError(504, str(exc)) from None
        except (BatcherClosedError, ModelUnavailableError) as exc:
            status = 503
            raise ProtocolError(503, str(exc)) from None
        except ModelNotFoundError as exc:
            status = 404
            raise ProtocolError(404, str(exc)) from None
        except Exception as exc:  # the model itself failed: 500, and the server goes on
            status = 500
            log.exception("model %s version %s failed", model, mv.version)
            raise ProtocolError(500, f"model {model!r} failed: {exc}") from None
        finally:
            watcher.cancel()
            if access_log is not None:
                compute_ns = trace.compute_input_ns + trace.compute_infer_ns + trace.compute_output_ns
                access_log.write(model=model, version=mv.version, status=status, id=header.get("id"),
                                 variant=route.variant if route else None, queue_ms=round(trace.queue_ns / 1e6, 3),
                                 compute_ms=round(compute_ns / 1e6, 3), batch_size=trace.batch_size,
                                 total_ms=round((time.perf_counter() - started) * 1000, 3))
        variant = route.variant if route is not None else None
        payload, json_length = encode_response(header, model, mv.version, outputs,
                                               {"routing_variant": variant} if variant else None)
        extra = {} if json_length is None else {HEADER_LENGTH: json_length}
        if variant:
            extra["X-Routing-Variant"] = variant
        return 200, payload, extra

    # -- repository (management: needs the API key) ----------------------------------------------------------

    @app.post("/v2/repository/index")
    async def repository_index(request: Request):
        body = await read_body(request)
        ready_only = False
        if body.strip():
            ready_only = bool(parse_json_object(body).get("ready", False))
        return manager.index(ready_only=ready_only)

    @app.post("/v2/repository/models/{model}/load")
    async def repository_load(model: str, request: Request):
        authorize(request)
        body = await read_body(request)
        if body.strip():
            params = parse_json_object(body).get("parameters") or {}
            if params:
                raise ProtocolError(400, "load parameters (config override, files) are not supported; "
                                         "change the repository and load again")
        await _manage(manager.api_load(model))
        return Response(status_code=200)

    @app.post("/v2/repository/models/{model}/unload")
    async def repository_unload(model: str, request: Request):
        authorize(request)
        await read_body(request)
        await _manage(manager.api_unload(model))
        return Response(status_code=200)

    # -- routing and experiments (management) ----------------------------------------------------------------

    @app.get("/v2/models/{model}/routing")
    async def get_routing(model: str, request: Request):
        authorize(request)
        if model not in manager._models:
            _raise_unknown(model)
        return manager.router.policy(model).describe()

    @app.put("/v2/models/{model}/routing")
    async def put_routing(model: str, request: Request):
        authorize(request)
        if model not in manager._models:
            _raise_unknown(model)
        try:
            policy = parse_policy(parse_json_object(await read_body(request)))
        except ConfigError as exc:
            raise ProtocolError(400, str(exc)) from None
        manager.router.set_policy(model, policy)
        return policy.describe()

    @app.delete("/v2/models/{model}/routing")
    async def delete_routing(model: str, request: Request):
        authorize(request)
        manager.router.clear(model)
        return manager.router.policy(model).describe()

    @app.get("/v2/models/{model}/experiment")
    async def experiment_report(model: str, request: Request):
        authorize(request)
        return _experiment(model).report()

    @app.post("/v2/models/{model}/experiment/outcome")
    async def experiment_outcome(model: str, request: Request):
        authorize(request)
        data = parse_json_object(await read_body(request))
        key, metric, value = data.get("key"), data.get("metric"), data.get("value", 1.0)
        if not isinstance(key, str) or not isinstance(metric, str):
            raise ProtocolError(400, "an outcome needs 'key' (the routing key) and 'metric' strings")
        try:
            variant = _experiment(model).record_outcome(key, metric, value)
        except LookupError as exc:
            raise ProtocolError(404, str(exc).strip("'\"")) from None
        except (ConfigError, ValueError, TypeError) as exc:
            raise ProtocolError(400, str(exc)) from None
        return {"key": key, "metric": metric, "variant": variant}

    def _experiment(model: str) -> ABTest:
        if model not in manager._models:
            _raise_unknown(model)
        policy = manager.router.policy(model)
        if not isinstance(policy, ABTest):
            raise ProtocolError(404, f"model {model!r} has no A/B experiment running (its routing policy is "
                                     f"{policy.kind!r}); start one with PUT v2/models/{model}/routing")
        return policy

    def _raise_unknown(model: str):
        raise ProtocolError(404, f"unknown model {model!r}")

    async def _manage(coro) -> None:
        try:
            await coro
        except (ControlModeError, ModelLoadError) as exc:
            raise ProtocolError(400, str(exc)) from None
        except ModelNotFoundError as exc:
            raise ProtocolError(404, str(exc)) from None
        except ModelUnavailableError as exc:
            raise ProtocolError(503, str(exc)) from None

    def check_inference_key(headers: Mapping[str, str]) -> None:
        if protect_inference and api_key:
            authorize_headers(headers)

    register_openai(app, manager, read_body=read_body, check_inference_key=check_inference_key,
                    routing_header=routing_header)
    register_playground(app)
    return KServeApp(app, infer)


def _check_requested_outputs(header: dict, backend) -> None:
    """Unknown output names are a 400 before the model runs, not after."""
    requested = header.get("outputs")
    if isinstance(requested, list):
        known = {s.name for s in backend.outputs}
        for out in requested:
            name = out.get("name") if isinstance(out, dict) else None
            if isinstance(name, str) and name not in known:
                raise ProtocolError(400, f"unknown output {name!r}; the model has {', '.join(sorted(known))}")


class KServeApp:
    """The ASGI app: ``POST /v2/models/{m}[/versions/{v}]/infer`` goes straight to the infer handler (FastAPI's
    middleware and routing cost more than the rest of a small request), everything else to FastAPI."""

    def __init__(self, app: FastAPI, infer):
        self.app, self._infer = app, infer

    def __getattr__(self, name: str):  # .state, .routes, ... of the FastAPI app
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            if path.startswith("/v2/models/") and path.endswith("/infer"):
                parts = path[11:-6].split("/")
                if len(parts) == 1 and parts[0]:
                    return await self._infer(scope, receive, send, parts[0], None)
                if len(parts) == 3 and parts[0] and parts[1] == "versions":
                    return await self._infer(scope, receive, send, parts[0], parts[2])
        await self.app(scope, receive, send)


class _ClientGone(Exception):
    """The HTTP client went away before its answer was ready."""
