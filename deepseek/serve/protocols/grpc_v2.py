"""The KServe v2 / Triton gRPC front end (``inference.GRPCInferenceService``) over a :class:`ModelManager`.

    server, port = create_grpc_server(manager, port=8001)   # inside the event loop that runs the manager
    await server.start()
    ...
    await server.stop(grace=5)

The service is the one Triton serves, built on the stubs ``tritonclient`` ships, so ``tritonclient.grpc`` (and
any client generated from Triton's ``grpc_service.proto``) works unchanged. It is a ``grpc.aio`` server: it runs
in the same asyncio loop as the HTTP server and the manager, and shares them.

RPCs: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig, ModelStatistics,
ModelInfer, ModelStreamInfer, RepositoryIndex, RepositoryModelLoad/Unload, and System/CudaSharedMemoryStatus
(always empty). Shared-memory registration, trace and log settings answer UNIMPLEMENTED.

ModelInfer takes ``raw_input_contents`` (one little-endian blob per input, in order, BOOL one byte; what
tritonclient sends) or typed ``contents`` (FP16/BF16 only raw), honours the requested ``outputs`` and answers
with ``raw_output_contents``. A BYTES input (e.g. encoded images for a model whose config.yaml has a
``preprocess`` step) comes raw in Triton's serialization (per element a little-endian uint32 length, then the
bytes: what tritonclient's ``set_data_from_numpy`` sends) or typed, one ``contents.bytes_contents`` per element;
it reaches the model exactly as over HTTP (a malformed blob, an image that does not decode, or BYTES for a model
without ``preprocess``: INVALID_ARGUMENT). Request parameters ``timeout`` (µs), ``priority`` and
``routing_key`` (or the ``x-user-id`` metadata) work as over HTTP; the client's gRPC deadline shortens the
queue timeout, and a request whose client cancels (or whose deadline passes) is dropped from the queue
before it costs compute. An A/B-routed answer carries the ``routing_variant`` parameter. ModelStreamInfer
answers each request of the stream as soon as it is done (so possibly out of order; match them by ``id``)
with ``infer_response``, or with ``error_message`` (prefixed ``[request id: ID]``, and the id also in
``infer_response.id``); the stream goes on after an error.

Status codes (the error table of :mod:`deepseek.serve.errors`, shared with HTTP and OpenAI's API):

    NOT_FOUND           unknown model or version (ModelReady answers ready=false instead)
    UNAVAILABLE         the model or version is not ready, or the server is shutting down
    INVALID_ARGUMENT    malformed request, inputs that do not fit the model, unknown output, bad parameters,
                        a load request with parameters (config override / files), a load that leaves no
                        version ready (the reason is in the message)
    RESOURCE_EXHAUSTED  the model's queue is full (also gRPC's own answer to a message over the size limit)
    DEADLINE_EXCEEDED   the request's ``timeout`` or the client's deadline passed while it waited
    INTERNAL            the model failed on the request (the server goes on serving)
    UNAUTHENTICATED     load/unload (and inference with ``protect_inference``) without the right API key
                        (``authorization: Bearer KEY`` or ``x-api-key: KEY`` metadata)
    PERMISSION_DENIED   load/unload on a server started without an API key
    FAILED_PRECONDITION load/unload in a model-control mode other than ``explicit``
    UNIMPLEMENTED       shared-memory registration, trace and log settings
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from typing import Any, Mapping, Optional

import grpc
import numpy as np
import torch
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from deepseek.serve.batching import RequestTrace
from deepseek.serve.config import DATATYPE_TO_TORCH
from deepseek.serve.errors import (DEADLINE, FORBIDDEN, INTERNAL, NOT_FOUND, UNAUTHENTICATED, ModelNotFoundError,
                                   ModelUnavailableError, RequestError, error_kind, error_message)
from deepseek.serve.manager import ModelManager, ModelVersion, triton_model_config
from deepseek.serve.protocols.common import (API_KEY_ENV, EXTENSIONS, SERVER_NAME, AccessLog, client_id,
                                             key_matches, kserve_datatype, presented_key, request_options,
                                             server_version, tensor_bytes)
from deepseek.serve.protocols.http_context import DEFAULT_ROUTING_HEADER, is_decimal
from deepseek.serve.protocols.kserve_tensors import bytes_elements, bytes_tensor

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
ROUTING_VARIANT = "routing_variant"
_FINAL_RESPONSE_REQUESTED = "triton_enable_empty_final_response"  # tritonclient's decoupled-stream flag

# The typed ``InferTensorContents`` field of each datatype; FP16 and BF16 have none (raw only).
_CONTENTS_FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
                   "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
                   "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
                   "FP32": "fp32_contents", "FP64": "fp64_contents"}
_ALL_CONTENTS_FIELDS = ("bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
                        "fp32_contents", "fp64_contents", "bytes_contents")


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message for an exception raised while answering a request (the error table of
    :mod:`deepseek.serve.errors`)."""
    return grpc.StatusCode[error_kind(exc).grpc], error_message(exc)


def _rpc(method):
    """Answer a unary RPC's exceptions with their status code (:func:`status_of`) instead of UNKNOWN."""

    @functools.wraps(method)
    async def handler(self, request, context):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            code, message = status_of(exc)
            if code == grpc.StatusCode.INTERNAL and not isinstance(exc, RequestError):
                log.exception("gRPC %s failed", method.__name__)
            await context.abort(code, message)

    return handler


# -- tensors in and out -------------------------------------------------------------------------------------

def parameters_dict(params: Mapping[str, service_pb2.InferParameter]) -> dict[str, Any]:
    """A ``map<string, InferParameter>`` as a plain dict (the value of whichever oneof field is set)."""
    result: dict[str, Any] = {}
    for key, param in params.items():
        kind = param.WhichOneof("parameter_choice")
        result[key] = None if kind is None else getattr(param, kind)
    return result


def _dtype(datatype: str, where: str) -> torch.dtype:
    if datatype not in DATATYPE_TO_TORCH:
        raise ValueError(f"{where}: unknown datatype {datatype!r}")
    dtype = DATATYPE_TO_TORCH[datatype]
    if dtype is None:
        raise ValueError(f"{where}: datatype {datatype} is not supported")
    return dtype


def _from_raw(blob: bytes, datatype: str, dtype: torch.dtype, shape: list[int], where: str) -> torch.Tensor:
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if len(blob) != expected:
        raise ValueError(f"{where}: {len(blob)} bytes of raw_input_contents do not fit shape {shape} of "
                         f"{datatype} ({expected} bytes)")
    if not expected:
        return torch.empty(0, dtype=dtype)
    if dtype == torch.bool:  # one byte each; any non-zero byte is true
        return torch.frombuffer(bytearray(blob), dtype=torch.uint8) != 0
    return torch.frombuffer(bytearray(blob), dtype=dtype)  # a copy: the tensor outlives the request message


def _from_contents(contents: service_pb2.InferTensorContents, datatype: str, dtype: torch.dtype,
                   shape: list[int], where: str) -> torch.Tensor:
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise ValueError(f"{where}: {datatype} data must be sent in raw_input_contents "
                         f"(InferTensorContents has no field for it)")
    stray = [f for f in _ALL_CONTENTS_FIELDS if f != field and len(getattr(contents, f))]
    if stray:
        raise ValueError(f"{where}: a {datatype} input takes contents.{field}, got {', '.join(stray)}")
    values = getattr(contents, field)
    numel = math.prod(shape)
    if len(values) != numel:
        raise ValueError(f"{where}: shape {shape} needs {numel} elements, contents.{field} has {len(values)}")
    try:
        return torch.tensor(list(values), dtype=dtype)
    except (RuntimeError, OverflowError, TypeError) as exc:  # e.g. 300 for an INT8 input
        raise ValueError(f"{where}: contents do not fit {datatype}: {exc}") from None


def _bytes_input(spec: service_pb2.ModelInferRequest.InferInputTensor, blob: Optional[bytes], shape: list[int],
                 where: str) -> np.ndarray:
    """A BYTES input as the numpy object array of ``bytes`` the HTTP front end makes, from a raw blob in Triton's
    serialization (the HTTP binary extension's parser) or from typed ``contents.bytes_contents``."""
    if blob is not None:
        return bytes_tensor(bytes_elements(blob, math.prod(shape), where), shape, where)
    if not spec.HasField("contents"):
        raise ValueError(f"{where} has no data (neither raw_input_contents nor contents)")
    stray = [f for f in _ALL_CONTENTS_FIELDS if f != "bytes_contents" and len(getattr(spec.contents, f))]
    if stray:
        raise ValueError(f"{where}: a BYTES input takes contents.bytes_contents, got {', '.join(stray)}")
    return bytes_tensor(list(spec.contents.bytes_contents), shape, where)


def parse_inputs(request: service_pb2.ModelInferRequest) -> dict[str, Any]:
    """The request's input tensors by name; ValueError or RequestError (INVALID_ARGUMENT) for anything malformed.
    A BYTES input (e.g. encoded images) comes back as a numpy object array of ``bytes``, as over HTTP: a model
    whose config.yaml has a ``preprocess`` step decodes it, any other refuses it when validating its inputs."""
    if not request.inputs:
        raise ValueError("the request has no inputs")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise ValueError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: send one per input, "
                         f"in the order of the inputs")
    tensors: dict[str, Any] = {}
    for i, spec in enumerate(request.inputs):
        if not spec.name:
            raise ValueError(f"inputs[{i}] has no name")
        where = f"input {spec.name!r}"
        if spec.name in tensors:
            raise ValueError(f"{where} is given twice")
        if "shared_memory_region" in spec.parameters:
            raise ValueError(f"{where}: shared memory is not supported; send the data in the request")
        shape = list(spec.shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"{where}: shape must be non-negative integers, got {shape}")
        if raw and spec.HasField("contents"):
            raise ValueError(f"{where}: typed contents cannot be mixed with raw_input_contents")
        if spec.datatype == "BYTES":
            tensors[spec.name] = _bytes_input(spec, raw[i] if raw else None, shape, where)
            continue
        dtype = _dtype(spec.datatype, where)
        if raw:
            tensor = _from_raw(raw[i], spec.datatype, dtype, shape, where)
        elif spec.HasField("contents"):
            tensor = _from_contents(spec.contents, spec.datatype, dtype, shape, where)
        else:
            raise ValueError(f"{where} has no data (neither raw_input_contents nor contents)")
        tensors[spec.name] = tensor.reshape(shape)
    return tensors


def requested_outputs(request: service_pb2.ModelInferRequest, mv: ModelVersion) -> list[str]:
    """The output names to answer with (all when none are requested); ValueError for an unknown one."""
    known = [s.name for s in mv.backend.outputs]
    if not request.outputs:
        return known
    names = []
    for out in request.outputs:
        if out.name not in known:
            raise ValueError(f"unknown output {out.name!r}; model {mv.name!r} has {', '.join(known)}")
        for unsupported in ("shared_memory_region", "classification"):
            if unsupported in out.parameters:
                raise ValueError(f"output {out.name!r}: parameter {unsupported!r} is not supported")
        names.append(out.name)
    return names


def encode_response(request: service_pb2.ModelInferRequest, mv: ModelVersion, names: list[str],
                    outputs: Mapping[str, torch.Tensor]) -> service_pb2.ModelInferResponse:
    """The ModelInferResponse with ``names`` as ``raw_output_contents`` (what tritonclient reads)."""
    response = service_pb2.ModelInferResponse(model_name=mv.name, model_version=str(mv.version), id=request.id)
    for name in names:
        if name not in outputs:
            raise RuntimeError(f"model {mv.name!r} returned no output {name!r}")
        t = outputs[name]
        response.outputs.add(name=name, datatype=kserve_datatype(t.dtype), shape=list(t.shape))
        response.raw_output_contents.append(tensor_bytes(t))
    return response


def _version(text: str) -> Optional[int]:
    if not text:
        return None
    if not is_decimal(text) or int(text) < 1:
        raise ValueError(f"invalid model version {text!r}: must be a positive integer")
    return int(text)


def _peer_host(context: grpc.aio.ServicerContext) -> Optional[str]:
    """The client's address without its port (``ipv4:127.0.0.1:5000`` -> ``ipv4:127.0.0.1``)."""
    peer = context.peer()
    return peer.rsplit(":", 1)[0] if peer else None


# -- the service ---------------------------------------------------------------------------------------------

class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over ``manager`` (see module docs for the RPCs and status codes)."""

    def __init__(self, manager: ModelManager, *, api_key: Optional[str] = None, protect_inference: bool = False,
                 access_log: Optional[AccessLog] = None, routing_header: str = DEFAULT_ROUTING_HEADER):
        self.manager = manager
        self.api_key = api_key
        self.protect_inference = bool(protect_inference and api_key)
        self.access_log = access_log
        self.routing_header = routing_header.lower()

    # -- helpers -----------------------------------------------------------------------------------------

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if not self.api_key:
            raise RequestError("the management API is disabled: start the server with --api-key "
                               f"(or set {API_KEY_ENV}) to enable it", FORBIDDEN)
        metadata = _metadata(context)
        if not key_matches(self.api_key, presented_key(metadata.get("authorization"), metadata.get("x-api-key"))):
            raise RequestError("missing or wrong API key (send metadata 'authorization: Bearer KEY' or "
                               "'x-api-key: KEY')", UNAUTHENTICATED)

    def _resolve(self, name: str, version_text: str) -> ModelVersion:
        """The READY version metadata/config answers describe: the one named, else the latest ready one
        (:meth:`ModelManager.get` consults no routing policy, so lookups are not counted as routed requests)."""
        return self.manager.get(name, _version(version_text))

    async def _infer(self, request: service_pb2.ModelInferRequest,
                     context: grpc.aio.ServicerContext) -> service_pb2.ModelInferResponse:
        """One inference; raises what :func:`status_of` maps (INTERNAL carries the model's error)."""
        started = time.perf_counter()
        key = None
        try:
            params = parameters_dict(request.parameters)
            timeout_ms, priority, key = request_options(params)
            remaining = context.time_remaining()
            if remaining is not None:  # the client's gRPC deadline bounds the queue wait too
                if remaining <= 0:
                    raise RequestError("the request's deadline has passed", DEADLINE)
                timeout_ms = remaining * 1000 if timeout_ms is None else min(timeout_ms, remaining * 1000)
            key = key or _metadata(context).get(self.routing_header)
            mv, route = self.manager.select(request.model_name, _version(request.model_version), key)
            inputs = parse_inputs(request)
            names = requested_outputs(request, mv)
        except Exception as exc:  # refused before any model: counted by status only (model names are the client's)
            code = status_of(exc)[0]
            if self.manager.metrics is not None:
                self.manager.metrics.observe_refused(code.name)
            if self.access_log is not None:
                self.access_log.write(protocol="grpc", route="grpc/infer", model=request.model_name,
                                      version=request.model_version, status=code.name, id=request.id,
                                      client=client_id(key, peer=_peer_host(context)),
                                      total_ms=round((time.perf_counter() - started) * 1000, 3))
            raise
        code, trace = grpc.StatusCode.OK, RequestTrace()
        try:
            outputs = await self.manager.run(mv, inputs, timeout_ms=timeout_ms, priority=priority, trace=trace)
            response = encode_response(request, mv, names, outputs)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED  # the client went away: the batcher has dropped the request
            raise
        except Exception as exc:
            code, message = status_of(exc)
            if code == grpc.StatusCode.INTERNAL:  # the model itself failed: INTERNAL, and the server goes on
                log.exception("model %s version %s failed", mv.name, mv.version)
                raise RequestError(f"model {mv.name!r} failed: {exc}", INTERNAL) from None
            raise
        finally:
            if self.access_log is not None:
                compute_ns = trace.compute_input_ns + trace.compute_infer_ns + trace.compute_output_ns
                self.access_log.write(protocol="grpc", route="grpc/infer", model=mv.name, version=mv.version,
                                      status=code.name, id=request.id, client=client_id(key, peer=_peer_host(context)),
                                      variant=route.variant if route else None,
                                      queue_ms=round(trace.queue_ns / 1e6, 3), compute_ms=round(compute_ns / 1e6, 3),
                                      batch_size=trace.batch_size,
                                      total_ms=round((time.perf_counter() - started) * 1000, 3))
        if route is not None and route.variant:
            response.parameters[ROUTING_VARIANT].string_param = route.variant
        if params.get(_FINAL_RESPONSE_REQUESTED) is True:  # a non-decoupled model: its one answer is final
            response.parameters["triton_final_response"].bool_param = True
        return response

    # -- server ------------------------------------------------------------------------------------------

    @_rpc
    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    @_rpc
    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self.manager.loaded and not self.manager.closing)

    @_rpc
    async def ServerMetadata(self, request, context):
        return service_pb2.ServerMetadataResponse(name=SERVER_NAME, version=server_version(), extensions=EXTENSIONS)

    # -- models ------------------------------------------------------------------------------------------

    @_rpc
    async def ModelReady(self, request, context):
        try:
            self._resolve(request.name, request.version)
        except (ModelNotFoundError, ModelUnavailableError):
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=True)

    @_rpc
    async def ModelMetadata(self, request, context):
        mv = self._resolve(request.name, request.version)
        meta = mv.backend.metadata()
        if not request.version:
            meta["versions"] = [str(v) for v, m in sorted(self.manager.versions(request.name).items(),
                                                          key=lambda kv: kv[0] or 0) if v is not None and m.ready]
        return service_pb2.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[service_pb2.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]],
            outputs=[service_pb2.ModelMetadataResponse.TensorMetadata(**t) for t in meta["outputs"]])

    @_rpc
    async def ModelConfig(self, request, context):
        mv = self._resolve(request.name, request.version)
        config = json_format.ParseDict(triton_model_config(mv), model_config_pb2.ModelConfig(),
                                       ignore_unknown_fields=True)
        return service_pb2.ModelConfigResponse(config=config)

    @_rpc
    async def ModelStatistics(self, request, context):
        stats = self.manager.statistics(request.name or None, _version(request.version))
        return json_format.ParseDict(stats, service_pb2.ModelStatisticsResponse(), ignore_unknown_fields=True)

    # -- inference -----------------------------------------------------------------------------------------

    @_rpc
    async def ModelInfer(self, request, context):
        if self.protect_inference:
            self._authorize(context)
        # Awaited in this task: when the client cancels or its deadline passes, grpc.aio cancels the task,
        # and the batcher drops the request if it is still queued.
        return await self._infer(request, context)

    async def ModelStreamInfer(self, request_iterator, context):
        """Answer each request of the stream as it completes (see module docs); errors do not end the stream."""
        if self.protect_inference:
            try:
                self._authorize(context)
            except RequestError as exc:
                await context.abort(*status_of(exc))
        answers: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        end = object()
        outstanding = 0

        async def answer(request: service_pb2.ModelInferRequest) -> None:
            try:
                answers.put_nowait(service_pb2.ModelStreamInferResponse(
                    infer_response=await self._infer(request, context)))
            except Exception as exc:
                code, message = status_of(exc)
                if code == grpc.StatusCode.INTERNAL and not isinstance(exc, RequestError):
                    log.exception("stream inference failed")
                prefix = f"[request id: {request.id}] " if request.id else ""
                answers.put_nowait(service_pb2.ModelStreamInferResponse(
                    error_message=prefix + message,
                    infer_response=service_pb2.ModelInferResponse(
                        model_name=request.model_name, model_version=request.model_version, id=request.id)))

        async def read() -> None:
            nonlocal outstanding
            try:
                async for request in request_iterator:
                    outstanding += 1
                    task = asyncio.ensure_future(answer(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            finally:
                answers.put_nowait(end)

        reader = asyncio.ensure_future(read())
        try:
            reading = True
            while reading or outstanding:
                item = await answers.get()
                if item is end:
                    reading = False
                    continue
                outstanding -= 1
                yield item
            await reader  # re-raises a broken request stream
        finally:  # the stream ended or was cancelled: drop what is still queued
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    # -- repository ----------------------------------------------------------------------------------------

    @_rpc
    async def RepositoryIndex(self, request, context):
        rows = self.manager.index(ready_only=request.ready)
        return service_pb2.RepositoryIndexResponse(models=[
            service_pb2.RepositoryIndexResponse.ModelIndex(name=r["name"], version=r["version"] or "",
                                                           state=r["state"] or "", reason=r["reason"] or "")
            for r in rows])

    @_rpc
    async def RepositoryModelLoad(self, request, context):
        self._authorize(context)
        if request.parameters:
            raise RequestError(f"load parameters ({', '.join(sorted(request.parameters))}) are not supported; "
                               "change the repository and load again")
        name = request.model_name
        await self.manager.api_load(name)  # ModelLoadError is a ValueError: INVALID_ARGUMENT
        return service_pb2.RepositoryModelLoadResponse()

    @_rpc
    async def RepositoryModelUnload(self, request, context):
        self._authorize(context)  # the `unload_dependents` parameter is moot: there are no ensembles
        await self.manager.api_unload(request.model_name)
        return service_pb2.RepositoryModelUnloadResponse()

    # -- shared memory: not supported, so there is never a region to report ----------------------------------

    @_rpc
    async def SystemSharedMemoryStatus(self, request, context):
        if request.name:
            raise RequestError(f"no system shared memory region {request.name!r} (shared memory is not supported)",
                               NOT_FOUND)
        return service_pb2.SystemSharedMemoryStatusResponse()

    @_rpc
    async def CudaSharedMemoryStatus(self, request, context):
        if request.name:
            raise RequestError(f"no CUDA shared memory region {request.name!r} (shared memory is not supported)",
                               NOT_FOUND)
        return service_pb2.CudaSharedMemoryStatusResponse()

    async def _unimplemented(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not supported by this server (no shared memory "
                                                           "registration, trace or log settings)")

    # The base class answers these too, but as a sync handler that an aio server reports as an exception.
    SystemSharedMemoryRegister = SystemSharedMemoryUnregister = _unimplemented
    CudaSharedMemoryRegister = CudaSharedMemoryUnregister = _unimplemented
    TraceSetting = LogSettings = _unimplemented


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, Any]:
    return {k.lower(): v for k, v in (context.invocation_metadata() or ())}


def create_grpc_server(manager: ModelManager, *, host: str = "127.0.0.1", port: int = 8081,
                       api_key: Optional[str] = None, protect_inference: bool = False,
                       max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, access_log: Optional[AccessLog] = None,
                       routing_header: str = DEFAULT_ROUTING_HEADER) -> tuple[grpc.aio.Server, int]:
    """A ``grpc.aio`` server with the service over ``manager``, bound (``port`` 0: a free one) but not started.

    Returns ``(server, bound_port)``; call it in the event loop that runs the manager, then
    ``await server.start()`` and at the end ``await server.stop(grace)``. ``max_message_bytes`` bounds both
    requests and responses. OSError when the address cannot be bound (also when the port is taken: port
    reuse is switched off, so two servers never share a port by accident)."""
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes),
               ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(options=options)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(manager, api_key=api_key, protect_inference=protect_inference, access_log=access_log,
                          routing_header=routing_header), server)
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot bind the gRPC server to {address}: {exc}") from None
    if not bound:
        raise OSError(f"cannot bind the gRPC server to {address}")
    return server, bound
