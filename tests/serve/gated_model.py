"""Test helpers for the serving tests: a model whose forward waits at a gate, and a real server in a thread.

    GATE.reset(); GATE.close()                      # the next forward call blocks until GATE.open()
    write_model(root, "m", versions=[1], config={"max_batch_size": 8, ...})   # served via this module's factory
    with running_server(manager, api_key="k") as base:    # "http://127.0.0.1:PORT"
        ...
    wait_for(lambda: GATE.calls == 1)               # bounded polling for a condition, never a bare sleep

``GatedModel`` computes ``y = 2 * x`` and records every batch it is called with (in call order), so a test
can hold one request in compute deterministically and then see exactly which inputs reached the model.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import yaml

WAIT_S = 30.0  # generous bound for any condition a test waits on; reaching it is a failure, not a timing


def wait_for(condition: Callable[[], bool], what: str = "condition", timeout_s: float = WAIT_S) -> None:
    """Poll ``condition`` until it holds; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


class Gate:
    """Holds every forward call while closed; records the batches that reached the model."""

    def __init__(self):
        self._open = threading.Event()
        self._lock = threading.Lock()
        self.batches: list[torch.Tensor] = []
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.batches = []
        self._open.set()

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    @property
    def calls(self) -> int:
        with self._lock:
            return len(self.batches)

    def values(self) -> list[list[float]]:
        """The first column of every batch, in call order (tests tag requests by their input value)."""
        with self._lock:
            return [b.reshape(b.shape[0], -1)[:, 0].tolist() if b.dim() else [b.item()] for b in self.batches]

    def enter(self, x: torch.Tensor) -> None:
        with self._lock:
            self.batches.append(x.detach().clone())
        if not self._open.wait(WAIT_S):
            raise RuntimeError("the gate was never opened")


GATE = Gate()


class GatedModel(torch.nn.Module):
    """``y = 2 * x``, after waiting at :data:`GATE`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        GATE.enter(x)
        return x * 2


class GatedLinear(torch.nn.Module):
    """:func:`reference_linear` (a seeded ``Linear(32, 10)``), after waiting at :data:`GATE`."""

    def __init__(self):
        super().__init__()
        self.linear = reference_linear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        GATE.enter(x)
        return self.linear(x)


def reference_linear() -> torch.nn.Module:
    """The ``Linear(32, 10)`` inside :class:`GatedLinear`, for computing expected outputs eagerly."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(1234)
    try:
        return torch.nn.Linear(32, 10).eval()
    finally:
        torch.random.set_rng_state(generator_state)


def gated_linear_config() -> dict:
    """config.yaml of :class:`GatedLinear` served batched as x [B, 32] -> y [B, 10]."""
    return {"backend": "torch", "max_batch_size": 64, "inputs": [{"name": "x", "datatype": "FP32", "shape": [32]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [10]}], "dynamic_batching": {},
            "parameters": {"entry_point": f"{__name__}:GatedLinear"}}


def factory() -> torch.nn.Module:
    """The torch backend's entry point (``parameters.entry_point``)."""
    return GatedModel()


def entry_point() -> str:
    return f"{__name__}:factory"


def model_config(max_batch_size: int = 8, shape: Sequence[int] = (1,), **extra: Any) -> dict:
    """A config.yaml mapping for the gated model: input ``x`` and output ``y`` of FP32 ``shape``."""
    return {"backend": "torch", "max_batch_size": max_batch_size,
            "inputs": [{"name": "x", "datatype": "FP32", "shape": list(shape)}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": list(shape)}],
            "parameters": {"entry_point": entry_point()}, **extra}


def linear_config(queue_delay_ms: float = 5) -> str:
    """config.yaml of a batched torch Linear(32, 10) served as x [B, 32] -> y [B, 10]."""
    return ("backend: torch\nmax_batch_size: 64\ninputs: [{name: x, datatype: FP32, shape: [32]}]\n"
            f"outputs: [{{name: y, datatype: FP32, shape: [10]}}]\ndynamic_batching: {{max_queue_delay_ms: {queue_delay_ms:g}}}\n")


def write_model(root: Path, name: str, versions: Sequence[int] = (1,), config: Optional[dict] = None) -> Path:
    """A gated model folder in the repository ``root`` with empty version folders (the entry point needs no files)."""
    folder = Path(root) / name
    for v in versions:
        (folder / str(v)).mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config if config is not None else model_config()))
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(manager, **app_kwargs: Any) -> Iterator[str]:
    """``create_app(manager, **app_kwargs)`` served by uvicorn on 127.0.0.1 in a thread; yields the base URL.

    On exit the server stops and its lifespan drains the manager."""
    import uvicorn

    from deepseek.serve.protocols.http_v2 import create_app

    app_kwargs.setdefault("max_request_bytes", 1 << 20)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(manager, **app_kwargs), host="127.0.0.1", port=port,
                                          log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), "the server to start")
    assert thread.is_alive(), "the server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        GATE.open()  # never leave a forward call (and so the server's drain) hanging
        server.should_exit = True
        thread.join(timeout=WAIT_S)
        assert not thread.is_alive(), "the server did not stop"


def infer_scalar(netloc: str, value: float) -> list:
    """One KServe v2 HTTP request with the real tritonclient: input ``x`` = [[value]] to model ``m``; its ``y``."""
    import numpy as np
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(netloc)
    try:
        inp = httpclient.InferInput("x", [1, 1], "FP32")
        inp.set_data_from_numpy(np.full((1, 1), value, dtype=np.float32))
        return client.infer("m", [inp]).as_numpy("y").tolist()
    finally:
        client.close()
