"""The KServe v2 (Open Inference Protocol) REST front end, as Triton serves it, over a :class:`ModelManager`.

    app = create_app(ModelManager(ModelRepository("models/")))
    uvicorn.run(app, port=8000)

Routes: ``GET /v2``, ``GET /v2/health/{live,ready}``, ``GET /v2/models/{m}[/versions/{v}][/ready]``,
``POST /v2/models/{m}[/versions/{v}]/infer``, ``POST /v2/repository/index``. Infer takes JSON tensors
(``data`` flat or nested, row-major) and the binary tensor extension (``Inference-Header-Content-Length``;
the default of ``tritonclient.http``); outputs come back as JSON, or binary when asked for with
``binary_data`` / ``binary_data_output``.

Errors are ``{"error": "..."}``: 400 malformed request or invalid inputs, 404 unknown model/version/route,
413 body over ``max_request_bytes``, 429 (``Retry-After: 1``) queue full, 503 not ready or shutting down,
504 deadline exceeded, 500 a model failure. Health answers are the status code alone. The server is ready
once the app has started (models loaded) and until it shuts down; a broken model does not make it unready.
The app's lifespan loads the repository on startup (unless already loaded) and drains it on shutdown.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from importlib import metadata as _metadata
from typing import Any, Optional

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepseek.serve.batching import BatcherClosedError, DeadlineExceededError, QueueFullError
from deepseek.serve.config import DATATYPE_TO_TORCH
from deepseek.serve.manager import ModelManager, ModelNotFoundError, ModelUnavailableError

log = logging.getLogger(__name__)

SERVER_NAME = "deepseek"
EXTENSIONS = ["binary_tensor_data", "model_repository"]
HEADER_LENGTH = "Inference-Header-Content-Length"
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024


def _server_version() -> str:
    try:
        return _metadata.version("deepseek-framework")
    except _metadata.PackageNotFoundError:
        return "0.0.0"


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
    if datatype not in DATATYPE_TO_TORCH:
        raise ProtocolError(400, f"{where}: unknown datatype {datatype!r}")
    dtype = DATATYPE_TO_TORCH[datatype]
    if dtype is None:
        raise ProtocolError(400, f"{where}: datatype {datatype} is not supported")
    return dtype


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
            tensor = torch.frombuffer(chunk, dtype=dtype) if size else torch.empty(0, dtype=dtype)
        else:
            if "data" not in spec:
                raise ProtocolError(400, f"{where} has no 'data' (and no binary_data_size)")
            flat = _flatten(spec["data"])
            if len(flat) != numel:
                raise ProtocolError(400, f"{where}: shape {shape} needs {numel} elements, data has {len(flat)}")
            try:
                tensor = torch.tensor(flat, dtype=dtype)
            except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
                raise ProtocolError(400, f"{where}: data does not fit {spec['datatype']}: {exc}") from None
        tensors[name] = tensor.reshape(shape)
    if offset != len(binary):
        raise ProtocolError(400, f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    return tensors


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    elif t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _datatype(dtype: torch.dtype) -> str:
    for name, value in DATATYPE_TO_TORCH.items():
        if value == dtype:
            return name
    raise RuntimeError(f"output dtype {dtype} has no KServe v2 datatype")


def encode_response(header: dict, model: str, version: Optional[int],
                    outputs: dict[str, torch.Tensor]) -> Response:
    """The infer response: JSON, or JSON + binary tensors when the request asks for binary outputs."""
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
    blobs, items = [], []
    for name, binary in selected:
        t = outputs[name]
        item: dict[str, Any] = {"name": name, "datatype": _datatype(t.dtype), "shape": list(t.shape)}
        if binary:
            blob = _tensor_bytes(t)
            item["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            item["data"] = t.detach().cpu().reshape(-1).tolist()
        items.append(item)
    body["outputs"] = items
    text = json.dumps(body, allow_nan=True).encode()  # NaN/Infinity as Triton writes them
    if not blobs:
        return Response(text, media_type="application/json")
    return Response(text + b"".join(blobs), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(text))})


# -- the app -----------------------------------------------------------------------------------------------

def parse_json_object(text: bytes) -> dict:
    """A request body that must be a JSON object; anything else is a 400 that says why."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(400, f"malformed JSON request: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(400, "the request must be a JSON object")
    return data


def create_app(manager: ModelManager, *, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """The KServe v2 REST app over ``manager`` (see module docs)."""
    state = {"ready": False}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if not manager.loaded:
            await manager.load_all()
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            await manager.close()  # drain: queued and running requests finish first

    app = FastAPI(title="deepseek KServe v2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.manager = manager

    @app.exception_handler(ProtocolError)
    async def _protocol_error(request: Request, exc: ProtocolError):
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

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
        try:
            return manager.get(model, parse_version(version))
        except ModelNotFoundError as exc:
            raise ProtocolError(404, str(exc)) from None
        except ModelUnavailableError as exc:
            raise ProtocolError(503, str(exc)) from None

    # -- server ------------------------------------------------------------------------------------------

    @app.get("/v2")
    async def server_metadata():
        return {"name": SERVER_NAME, "version": _server_version(), "extensions": EXTENSIONS}

    @app.get("/v2/health/live")
    async def live():
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready():
        return Response(status_code=200 if state["ready"] and not manager.closing else 503)

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

    @app.post("/v2/models/{model}/infer")
    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer(model: str, request: Request, version: Optional[str] = None):
        body = await read_body(request)
        header_length = request.headers.get(HEADER_LENGTH.lower())
        if header_length is not None:
            try:
                n = int(header_length)
            except ValueError:
                raise ProtocolError(400, f"bad {HEADER_LENGTH} {header_length!r}") from None
            if not 0 < n <= len(body):
                raise ProtocolError(400, f"{HEADER_LENGTH} {n} does not fit the body of {len(body)} bytes")
            text, binary = body[:n], body[n:]
        else:
            text, binary = body, b""
        header = parse_json_object(text)
        mv = lookup(model, version)
        inputs = parse_inputs(header, binary)
        try:
            outputs = await manager.infer(model, mv.version, inputs)
        except ValueError as exc:
            raise ProtocolError(400, str(exc)) from None
        except QueueFullError as exc:
            raise ProtocolError(429, str(exc), {"Retry-After": "1"}) from None
        except DeadlineExceededError as exc:
            raise ProtocolError(504, str(exc)) from None
        except (BatcherClosedError, ModelUnavailableError) as exc:
            raise ProtocolError(503, str(exc)) from None
        except ModelNotFoundError as exc:
            raise ProtocolError(404, str(exc)) from None
        except Exception as exc:  # the model itself failed: 500, and the server goes on
            log.exception("model %s version %s failed", model, mv.version)
            raise ProtocolError(500, f"model {model!r} failed: {exc}") from None
        return encode_response(header, model, mv.version, outputs)

    # -- repository --------------------------------------------------------------------------------------

    @app.post("/v2/repository/index")
    async def repository_index(request: Request):
        body = await read_body(request)
        ready_only = False
        if body.strip():
            ready_only = bool(parse_json_object(body).get("ready", False))
        return manager.index(ready_only=ready_only)

    return app
