"""The design documents' API names, kept here (and only here) as thin aliases over the real implementation.

    from deepseek.compat import DeepseekServing
    DeepseekServing(model, port=8080).start()      # today: ds.Server(model, port=8080).start()
    batcher = ds.DynamicBatcher(model, max_batch_size=32, timeout_ms=5)   # deepseek.serve.batching, usable alone
    with ds.amp.autocast(): ...                     # deepseek.hardware's precision choice
    ds.prune.l1_norm(model, amount=0.3)             # deepseek.compress.prune_channels (L1 importance)

Every name maps to one real function or class (docs/design-names.md has the table); nothing here computes
anything the real code does not. The namespaces ``ds.amp``, ``ds.prune``, ``ds.quantization``, ``ds.distill``
and ``deepseek.experiment`` are tiny modules that re-export from here. New code uses the real names; nothing in
the framework imports this module.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from deepseek.compress.distill import distillation_loss
from deepseek.compress.prune import PruneReport, prune_channels, prune_unstructured
from deepseek.compress.qat import convert_qat, prepare_qat
from deepseek.config import ConfigError
from deepseek.hardware import autocast as _precision_autocast
from deepseek.hardware import resolve_precision
from deepseek.serve.batching import DynamicBatcher as _AsyncBatcher
from deepseek.serve.routing import ABTest
from deepseek.serve.server import Server as DeepseekServing

__all__ = ["ABTest", "DeepseekServing", "DynamicBatcher", "GradScaler", "TemperatureCrossEntropy", "autocast",
           "convert", "l1_norm", "prepare"]


def _device(device: Union[str, torch.device, None]) -> torch.device:
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


# -- ds.DynamicBatcher -----------------------------------------------------------------------------

class DynamicBatcher:
    """``ds.DynamicBatcher(model, max_batch_size=32, timeout_ms=5)``: the server's batcher, usable from plain code.

    ``model`` is any callable from a tensor of rows ``[n, ...]`` to outputs ``[n, ...]`` (a module, or a
    function); it may be given later with :meth:`bind`. :meth:`infer` (blocking, any thread) and :meth:`submit`
    (async) queue rows in :class:`deepseek.serve.batching.DynamicBatcher`, which runs them in batches of up
    to ``max_batch_size`` rows, waiting at most ``timeout_ms`` for a batch to fill; :meth:`infer_many` sends
    many requests at once (so they share batches). The real batcher lives on its own event-loop thread, so
    callers need no asyncio. Other keyword arguments (``preferred_batch_sizes``, ``max_queue_size``, ...)
    go to the real batcher unchanged; ``stats`` is its statistics. ``close()`` (or ``with``) drains and stops.
    """

    def __init__(self, model: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, *, max_batch_size: int = 64,
                 timeout_ms: float = 50.0, **options: Any):
        self.max_batch_size, self.timeout_ms, self.options = max_batch_size, timeout_ms, options
        self._model = model
        self._lock = threading.Lock()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._batcher: Optional[_AsyncBatcher] = None
        # Validate the settings now (the real batcher's checks), not at the first request.
        with concurrent.futures.ThreadPoolExecutor(1) as unused:
            _AsyncBatcher(self._run_batch, max_batch_size=max_batch_size, timeout_ms=timeout_ms, executor=unused,
                          **options)

    def bind(self, model: Callable[[torch.Tensor], torch.Tensor]) -> "DynamicBatcher":
        """Set the model the batches run through (before the first request); returns self."""
        if self._batcher is not None:
            raise ConfigError("bind() the model before the first request")
        self._model = model
        return self

    def _run_batch(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"y": self._model(inputs["x"])}

    def _started(self) -> _AsyncBatcher:
        if self._model is None:
            raise ConfigError("DynamicBatcher has no model: pass it first (DynamicBatcher(model, ...)) or bind(model)")
        with self._lock:
            if self._batcher is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name="ds-dynamic-batcher", daemon=True)
                self._thread.start()
                self._batcher = _AsyncBatcher(self._run_batch, max_batch_size=self.max_batch_size,
                                              timeout_ms=self.timeout_ms, **self.options)
            return self._batcher

    def _check(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        if not isinstance(rows, torch.Tensor) or rows.dim() == 0:
            raise ConfigError(f"DynamicBatcher takes a tensor of rows [n, ...], got {type(rows).__name__}")
        return {"x": rows}

    def _call(self, coroutine_fn: Callable[[_AsyncBatcher], Any]) -> concurrent.futures.Future:
        batcher = self._started()
        return asyncio.run_coroutine_threadsafe(coroutine_fn(batcher), self._loop)

    def infer(self, rows: torch.Tensor) -> torch.Tensor:
        """The model's outputs for ``rows`` [n, ...] (blocks; the rows may share a batch with other callers')."""
        inputs = self._check(rows)
        return self._call(lambda batcher: batcher.submit(inputs)).result()["y"]

    def infer_many(self, requests: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Outputs of many requests sent together: all are queued before the next batch is cut, so they share
        batches of up to ``max_batch_size`` rows."""
        inputs = [self._check(rows) for rows in requests]

        async def together(batcher: _AsyncBatcher) -> list:
            return await asyncio.gather(*(batcher.submit(one) for one in inputs))

        return [outputs["y"] for outputs in self._call(together).result()]

    async def submit(self, rows: torch.Tensor) -> torch.Tensor:
        """:meth:`infer` for asyncio code (awaits without blocking the caller's event loop)."""
        inputs = self._check(rows)
        return (await asyncio.wrap_future(self._call(lambda batcher: batcher.submit(inputs))))["y"]

    @property
    def stats(self):
        """The real batcher's :class:`~deepseek.serve.batching.BatcherStats` (requests, batches, batch sizes)."""
        return self._started().stats

    def close(self) -> None:
        """Finish every queued request, then stop the batcher's thread."""
        with self._lock:
            batcher, loop, thread = self._batcher, self._loop, self._thread
            self._batcher = self._loop = self._thread = None
        if batcher is None:
            return
        asyncio.run_coroutine_threadsafe(batcher.stop(drain=True), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()

    def __enter__(self) -> "DynamicBatcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- ds.amp ------------------------------------------------------------------------------------------

_PRECISION_OF = {None: "auto", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def autocast(device_type: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None,
             enabled: bool = True):
    """``with ds.amp.autocast():`` mixed precision as the Trainer chooses it (:mod:`deepseek.hardware`).

    No arguments: the device is CUDA when there is one, else the CPU, and the precision ``auto`` — bf16 only
    where its products are measured fast here (CUDA with bf16, or a CPU with fast bf16), fp16 on a CUDA GPU
    without bf16, else fp32, which is a no-op context. An explicit ``dtype`` is honoured (with a warning where
    it is slow); fp16 on a CPU is refused, as ``precision=fp16`` is.
    """
    if not enabled:
        return contextlib.nullcontext()
    if dtype not in _PRECISION_OF:
        raise ConfigError(f"autocast dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")
    device = _device(device_type)
    try:
        choice = resolve_precision(_PRECISION_OF[dtype], device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return _precision_autocast(choice, device.type)


class GradScaler(torch.amp.GradScaler):
    """``ds.amp.GradScaler()``: torch's loss scaler where the Trainer uses one, a pass-through elsewhere.

    Enabled only when the precision resolves to fp16 on CUDA (the only case where gradients underflow); on a
    CPU, or with bf16/fp32, ``scale(loss)`` returns ``loss``, ``step(optimizer)`` is ``optimizer.step()`` and
    ``update()`` does nothing, so the usual scaler loop runs unchanged everywhere.
    """

    def __init__(self, device: Union[str, torch.device, None] = None, *, precision: str = "auto", **kwargs: Any):
        device = _device(device)
        fp16 = device.type == "cuda" and resolve_precision(precision, device).precision == "fp16"
        super().__init__(device.type, enabled=fp16 and kwargs.pop("enabled", True), **kwargs)


# -- ds.prune, ds.quantization, ds.distill ------------------------------------------------------------------

def l1_norm(model: nn.Module, amount: float, *, structured: bool = True) -> tuple[nn.Module, PruneReport]:
    """``ds.prune.l1_norm(model, amount=0.3)``: prune by L1 norm; returns ``(model, report)``.

    ``structured=True`` (default): :func:`deepseek.compress.prune_channels` — FFN channels and attention heads
    ranked by L1 norm, ``amount`` of them removed: a new, really smaller model. ``structured=False``:
    :func:`deepseek.compress.prune_unstructured` — the ``amount`` smallest-magnitude weights zeroed in place.
    """
    try:
        if structured:
            return prune_channels(model, amount)
        return model, prune_unstructured(model, amount)
    except TypeError as exc:  # not our transformer: say where generic pruning lives
        raise ConfigError(f"{exc}; for other modules use torch.nn.utils.prune.l1_unstructured / ln_structured") \
            from None


def prepare(model: nn.Module, scheme: str = "int8-dynamic", **options: Any) -> nn.Module:
    """``ds.quantization.prepare(model)``: quantization-aware training, :func:`deepseek.compress.prepare_qat`.

    Swaps in fake-quantized modules (in place; returns the model); train, then :func:`convert`. ``scheme`` is
    one of ``int8-dynamic``, ``int8-weight``, ``int4-weight``. Post-training quantization has no prepare step
    here: :func:`deepseek.compress.quantize` (dynamic/weight-only) or ``quantize_static_int8`` (calibrated).
    """
    if not isinstance(scheme, str):
        raise ConfigError(f"prepare takes a scheme name (int8-dynamic, int8-weight, int4-weight), not a torch "
                          f"qconfig: got {type(scheme).__name__}")
    return prepare_qat(model, scheme, **options)


def convert(model: nn.Module) -> nn.Module:
    """``ds.quantization.convert(model)``: the prepared model, really quantized (:func:`deepseek.compress.convert_qat`)."""
    return convert_qat(model)


class TemperatureCrossEntropy(nn.Module):
    """``ds.distill.TemperatureCrossEntropy(temperature=2.0)``: the distillation loss as a module.

    ``loss(student_logits, teacher_logits, targets=None)`` is :func:`deepseek.compress.distillation_loss`:
    ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, targets)``. The KL differs from the
    soft cross-entropy ``-sum(teacher_T * log student_T)`` only by the teacher's entropy, a constant for the
    student: the same gradients. ``alpha=1.0`` (default) is the pure soft-label term; with ``targets``, a
    smaller ``alpha`` mixes in the hard labels.
    """

    def __init__(self, temperature: float = 2.0, alpha: float = 1.0, ignore_index: int = -100):
        super().__init__()
        self.temperature, self.alpha, self.ignore_index = temperature, alpha, ignore_index

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        return distillation_loss(student_logits, teacher_logits, targets, temperature=self.temperature,
                                 alpha=self.alpha, ignore_index=self.ignore_index)
