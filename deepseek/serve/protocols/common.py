"""What the HTTP and gRPC front ends share: request parameters, API keys and the access log.

    timeout_ms, priority, key = request_options(params)   # Triton's `timeout` (µs) and `priority`
    if not key_matches(server_key, presented): ...         # constant-time comparison
    access_log.write(model="digits", version=1, status=200, ...)   # one JSON line
"""

from __future__ import annotations

import hmac
import json
import math
import sys
import threading
import time
from pathlib import Path
from importlib import metadata
from typing import Any, Mapping, Optional, TextIO

import torch

from deepseek.serve.config import DATATYPE_TO_TORCH

SERVER_NAME = "deepseek"
EXTENSIONS = ["binary_tensor_data", "model_repository", "model_configuration", "statistics", "schedule_policy"]
ROUTING_KEY_PARAMETER = "routing_key"
API_KEY_ENV = "DS_API_KEY"


def server_version() -> str:
    try:
        return metadata.version("deepseek-framework")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def tensor_bytes(t: torch.Tensor) -> bytes:
    """A tensor as the protocol's raw bytes: little-endian, row-major, BOOL one byte each."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    elif t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def kserve_datatype(dtype: torch.dtype) -> str:
    """The KServe v2 datatype name of a torch dtype."""
    for name, value in DATATYPE_TO_TORCH.items():
        if value == dtype:
            return name
    raise RuntimeError(f"output dtype {dtype} has no KServe v2 datatype")


def request_options(params: Any) -> tuple[Optional[float], Optional[int], Optional[str]]:
    """``(timeout_ms, priority, routing_key)`` from a request's ``parameters``; ValueError when malformed.

    ``timeout`` is in microseconds, as tritonclient sends it; ``priority`` is 1 (highest) .. the model's
    ``priority_levels``; ``routing_key`` sticks a request to an A/B variant (the HTTP header does too)."""
    if params is None:
        return None, None, None
    if not isinstance(params, Mapping):
        raise ValueError("'parameters' must be an object")
    timeout_ms = priority = key = None
    if "timeout" in params:
        timeout = params["timeout"]
        # finite: a JSON integer too large for a float, NaN or Infinity is not a deadline (and must not be a 500)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not _finite(timeout) or timeout < 0:
            raise ValueError(f"parameter 'timeout' must be a non-negative number of microseconds, got {timeout!r}")
        timeout_ms = timeout / 1000 if timeout > 0 else None  # 0 = no timeout, as in Triton
    if "priority" in params:
        priority = params["priority"]
        if isinstance(priority, bool) or not isinstance(priority, int) or priority < 0:
            raise ValueError(f"parameter 'priority' must be a non-negative integer, got {priority!r}")
        priority = priority or None  # 0 = the model's default level, as in Triton
    if ROUTING_KEY_PARAMETER in params:
        key = params[ROUTING_KEY_PARAMETER]
        if not isinstance(key, str):
            raise ValueError(f"parameter '{ROUTING_KEY_PARAMETER}' must be a string")
    return timeout_ms, priority, key


def _finite(x: int | float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond the float range
        return False


def key_matches(expected: Optional[str], presented: Optional[str]) -> bool:
    """True when ``presented`` is the server's API key (constant time; never true without a key set)."""
    if not expected or presented is None:
        return False
    return hmac.compare_digest(expected.encode(), presented.encode())


def presented_key(authorization: Optional[str], x_api_key: Optional[str]) -> Optional[str]:
    """The key a client sent as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``."""
    if x_api_key:
        return x_api_key
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None


def client_id(routing_key: Optional[str] = None, user: Optional[str] = None,
              peer: Optional[str] = None) -> Optional[str]:
    """Who sent a request, for the access log's ``client``: the routing key (header or parameter) when given, else
    the OpenAI ``user`` field, else the peer's address (no port: one client opens many connections)."""
    if routing_key:
        return routing_key
    if user:
        return user
    return peer


class AccessLog:
    """Structured access log: one JSON object per inference request, to a file or a stream.

    Fields (``None`` where a route has no such thing): time, route, model, version, adapter, variant, status, id,
    client, queue_ms, compute_ms, total_ms, batch_size, tokens_in, tokens_out, ttft_ms; ``ds logs`` reads them."""

    def __init__(self, target: str | Path | TextIO):
        if isinstance(target, (str, Path)):
            self._stream: TextIO = sys.stderr if str(target) == "-" else open(target, "a", buffering=1)
            self._owned = str(target) != "-"
        else:
            self._stream, self._owned = target, False
        self._lock = threading.Lock()

    def write(self, **fields: Any) -> None:
        record = {"time": round(time.time(), 6), **fields}
        line = json.dumps(record, separators=(",", ":"), default=str)
        with self._lock:
            self._stream.write(line + "\n")

    def close(self) -> None:
        if self._owned:
            self._stream.close()
