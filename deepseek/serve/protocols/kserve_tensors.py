"""KServe v2 tensors over HTTP: JSON ``data`` (flat or nested, row-major) and the binary tensor extension.

    inputs = parse_inputs(header, binary)            # {name: tensor}; RequestError (400) for anything malformed
    body, json_length = encode_response(header, "m", 1, outputs)   # json_length: Inference-Header-Content-Length

JSON elements must have the datatype's JSON type, as Triton requires: ``true``/``false`` for BOOL, integers for
the integer types, numbers for the floating ones. A boolean is never read as 1, nor a string or a float as an
integer.
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional

import numpy as np
import orjson
import torch

from deepseek.serve.config import DATATYPE_TO_TORCH
from deepseek.serve.errors import RequestError
from deepseek.serve.protocols.common import kserve_datatype, tensor_bytes

HEADER_LENGTH = "Inference-Header-Content-Length"


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
        raise RequestError(f"{where}: shape must be a list of non-negative integers, got {value!r}")
    return value


def _dtype(datatype: Any, where: str) -> torch.dtype:
    if not isinstance(datatype, str) or datatype not in DATATYPE_TO_TORCH:  # a JSON list/object is unhashable
        raise RequestError(f"{where}: unknown datatype {datatype!r}")
    dtype = DATATYPE_TO_TORCH[datatype]
    if dtype is None:
        raise RequestError(f"{where}: datatype {datatype} is not supported")
    return dtype


_NUMPY_DTYPES = {torch.bool: np.bool_, torch.uint8: np.uint8, torch.uint16: np.uint16, torch.uint32: np.uint32,
                 torch.uint64: np.uint64, torch.int8: np.int8, torch.int16: np.int16, torch.int32: np.int32,
                 torch.int64: np.int64, torch.float16: np.float16, torch.float32: np.float32,
                 torch.float64: np.float64}


# dtypes orjson writes straight from a numpy array
_JSON_NUMPY = {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float32, torch.float64}


def _element_types(data: Any) -> set[type]:
    """The Python types of the leaves of nested lists (``set(map(type, ...))`` per list: C speed per element)."""
    if not isinstance(data, list):
        return {type(data)}
    types: set[type] = set()
    stack = [data]
    while stack:
        items = stack.pop()
        found = set(map(type, items))
        if list in found:  # a nested level (or a ragged one): walk into the lists
            found.discard(list)
            stack.extend(item for item in items if isinstance(item, list))
        types |= found
    return types


def _json_types(dtype: torch.dtype) -> tuple[set[type], str]:
    """The JSON element types a datatype takes, and their name for the error message."""
    if dtype == torch.bool:
        return {bool}, "true/false"
    if dtype.is_floating_point:
        return {int, float}, "numbers"
    return {int}, "integers"


def _tensor_from_json(data: Any, dtype: torch.dtype, shape: list[int], numel: int, where: str,
                      datatype: str) -> torch.Tensor:
    """A tensor from JSON ``data`` (flat or nested, row-major); RequestError (400) when it does not fit."""
    allowed, allowed_name = _json_types(dtype)
    wrong = _element_types(data) - allowed
    if wrong:
        names = ", ".join(sorted("null" if t is type(None) else "boolean" if t is bool else t.__name__ for t in wrong))
        raise RequestError(f"{where}: {datatype} data must be {allowed_name}, got {names}")
    np_dtype = _NUMPY_DTYPES.get(dtype)
    if np_dtype is None or not isinstance(data, list):  # BF16 (numpy has none) and scalars: torch's own path
        flat = _flatten(data)
        if len(flat) != numel:
            raise RequestError(f"{where}: shape {shape} needs {numel} elements, data has {len(flat)}")
        try:
            return torch.tensor(flat, dtype=dtype).reshape(shape)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise RequestError(f"{where}: data does not fit {datatype}: {exc}") from None
    try:
        array = np.asarray(data, dtype=np_dtype)  # ints out of range and ragged lists raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise RequestError(f"{where}: data does not fit {datatype} (ragged, or out of range): {exc}") from None
    if array.size != numel:
        raise RequestError(f"{where}: shape {shape} needs {numel} elements, data has {array.size}")
    return torch.from_numpy(array.reshape(shape))


def bytes_elements(blob: bytes, numel: int, where: str) -> list[bytes]:
    """BYTES binary data: ``numel`` elements, each a little-endian uint32 length and that many bytes (Triton's
    serialization, what tritonclient sends over HTTP and in gRPC's ``raw_input_contents``)."""
    items, offset = [], 0
    for _ in range(numel):
        if offset + 4 > len(blob):
            raise RequestError(f"{where}: BYTES binary data ends inside an element's 4-byte length")
        size = int.from_bytes(blob[offset:offset + 4], "little")
        offset += 4
        if offset + size > len(blob):
            raise RequestError(f"{where}: a BYTES element of {size} bytes runs past the binary data")
        items.append(blob[offset:offset + size])
        offset += size
    if offset != len(blob):
        raise RequestError(f"{where}: {len(blob) - offset} bytes of BYTES binary data left after {numel} elements")
    return items


def bytes_tensor(items: list, shape: list[int], where: str) -> np.ndarray:
    """BYTES elements as a numpy object array of ``bytes`` (JSON strings are UTF-8 encoded)."""
    if len(items) != math.prod(shape):
        raise RequestError(f"{where}: shape {shape} needs {math.prod(shape)} elements, data has {len(items)}")
    if any(not isinstance(item, (str, bytes)) for item in items):
        raise RequestError(f"{where}: BYTES data must be strings")
    array = np.empty(len(items), dtype=object)
    array[:] = [item.encode() if isinstance(item, str) else item for item in items]
    return array.reshape(shape)


def parse_inputs(header: dict, binary: bytes) -> dict[str, torch.Tensor]:
    """The request's input tensors; RequestError (400) for anything malformed. A BYTES input (Triton's strings,
    e.g. encoded images) comes back as a numpy object array of ``bytes``, for a model whose config.yaml decodes
    it (``preprocess``); any other model refuses it when validating its inputs."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError("request needs a non-empty 'inputs' list")
    tensors: dict[str, torch.Tensor] = {}
    offset = 0
    for i, spec in enumerate(inputs):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise RequestError(f"inputs[{i}] must be an object with a 'name'")
        name = spec["name"]
        where = f"input {name!r}"
        if name in tensors:
            raise RequestError(f"{where} is given twice")
        shape = _shape(spec.get("shape"), where)
        numel = math.prod(shape)
        params = spec.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if spec.get("datatype") == "BYTES":
            if size is not None:
                if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
                    raise RequestError(f"{where}: binary_data_size {size!r} exceeds the binary data sent")
                items: list = bytes_elements(binary[offset:offset + size], numel, where)
                offset += size
            elif "data" not in spec:
                raise RequestError(f"{where} has no 'data' (and no binary_data_size)")
            else:
                items = _flatten(spec["data"])
            tensors[name] = bytes_tensor(items, shape, where)
            continue
        dtype = _dtype(spec.get("datatype"), where)
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise RequestError(f"{where}: binary_data_size {size!r} exceeds the binary data sent")
            itemsize = torch.empty((), dtype=dtype).element_size()
            if size != numel * itemsize:
                raise RequestError(f"{where}: {size} bytes of binary data do not fit shape {shape} "
                                         f"of {spec['datatype']} ({numel * itemsize} bytes)")
            chunk = bytearray(binary[offset:offset + size])
            offset += size
            tensor = (torch.frombuffer(chunk, dtype=dtype) if size else torch.empty(0, dtype=dtype)).reshape(shape)
        else:
            if "data" not in spec:
                raise RequestError(f"{where} has no 'data' (and no binary_data_size)")
            tensor = _tensor_from_json(spec["data"], dtype, shape, numel, where, spec["datatype"])
        tensors[name] = tensor
    if offset != len(binary):
        raise RequestError(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
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
            raise RequestError("'outputs' must be a list")
        selected = []
        for i, out in enumerate(requested):
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise RequestError(f"outputs[{i}] must be an object with a 'name'")
            if out["name"] not in outputs:
                raise RequestError(f"unknown output {out['name']!r}; the model has {', '.join(outputs)}")
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


def check_requested_outputs(header: dict, backend) -> None:
    """Unknown output names are a 400 before the model runs, not after."""
    requested = header.get("outputs")
    if isinstance(requested, list):
        known = {s.name for s in backend.outputs}
        for out in requested:
            name = out.get("name") if isinstance(out, dict) else None
            if isinstance(name, str) and name not in known:
                raise RequestError(f"unknown output {name!r}; the model has {', '.join(sorted(known))}")
