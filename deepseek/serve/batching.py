"""Dynamic batching: many small requests in, few large model calls out (Triton's dynamic batcher, in asyncio).

    batcher = DynamicBatcher(run_batch, max_batch_size=64, timeout_ms=50)
    outputs = await batcher.submit({"x": x})          # x: [n, ...] rows; outputs: {"y": [n, ...]}

Requests wait in a bounded queue. A batch is cut when the queue holds ``max_batch_size`` rows (or the
largest of ``preferred_batch_sizes`` that fits), or when the oldest request has waited ``timeout_ms``
(``max_queue_delay_ms`` in a model's config). Under light load the wait is skipped: while recent batches
held about one request, a request that finds the model idle runs at once (a lone request never pays the
queue delay); once load builds up and batches grow, the batcher waits to fill them — except that a model
left idle starts at once on half a recent batch, so that it computes while the answered clients come back. Compatible inputs are concatenated along the batch
dimension — ragged ones padded to the longest where ``pad_values`` names the input — and each output is
split back by rows, in order. With ``combine=False`` (a model without a batch dimension, or one that does
not batch dynamically) every request runs alone but still gets the queue, deadlines and statistics.
With ``priority_levels`` > 1 a request's ``priority`` (1 = highest) picks who goes first; FIFO within a level. The model runs in a worker thread under ``torch.inference_mode``, so the
event loop keeps accepting requests while a batch computes; ``instances`` batches may run at once.

A full queue rejects at once (:class:`QueueFullError`), a request past its own deadline fails with
:class:`DeadlineExceededError` (or, with ``timeout_action="delay"``, waits behind the unexpired ones), and a request whose caller went away (its task cancelled, e.g. a client
disconnect) is dropped before it costs compute. ``stop()`` drains what is queued before returning.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from deepseek.errors import QueueFullError

Inputs = Mapping[str, torch.Tensor]
Outputs = dict[str, torch.Tensor]


class DeadlineExceededError(TimeoutError):
    """The request waited past its timeout (HTTP 504, gRPC DEADLINE_EXCEEDED)."""


class BatcherClosedError(RuntimeError):
    """The batcher is stopping and takes no new requests (HTTP 503)."""


@dataclass
class RequestTrace:
    """Where one request's time went (filled in by the batcher when passed to :meth:`DynamicBatcher.submit`)."""

    queue_ns: int = 0  # enqueued -> its batch starts
    compute_input_ns: int = 0  # concatenating / padding the batch
    compute_infer_ns: int = 0  # the model call
    compute_output_ns: int = 0  # splitting the outputs back
    batch_size: int = 0  # rows of the batch it ran in


@dataclass
class BatchRecord:
    """One executed batch, given to the ``on_batch`` callback (Triton's per-batch-size statistics)."""

    size: int
    requests: int
    compute_input_ns: int
    compute_infer_ns: int
    compute_output_ns: int
    ok: bool


@dataclass(eq=False)
class _Request:
    inputs: Inputs
    rows: int
    signature: tuple
    future: asyncio.Future
    enqueued: float
    deadline: Optional[float]
    priority: int = 1
    seq: int = 0
    trace: Optional[RequestTrace] = None


@dataclass
class BatcherStats:
    requests: int = 0
    batches: int = 0
    rows: int = 0
    rejected: int = 0
    expired: int = 0
    dropped: int = 0  # requests removed from the queue without computing them
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)

    @property
    def mean_batch_size(self) -> float:
        return self.rows / self.batches if self.batches else 0.0


class DynamicBatcher:
    """Queue requests and run them through ``run_batch(inputs) -> outputs`` in batches (see module docs)."""

    def __init__(self, run_batch: Callable[[Inputs], Mapping[str, torch.Tensor]], *, max_batch_size: int = 64,
                 timeout_ms: float = 50.0, preferred_batch_sizes: Sequence[int] = (), max_queue_size: int = 1024,
                 default_timeout_ms: Optional[float] = None, pad_values: Optional[Mapping[str, float]] = None,
                 instances: int = 1, executor: Optional[concurrent.futures.Executor] = None, combine: bool = True,
                 priority_levels: int = 0, default_priority: Optional[int] = None, timeout_action: str = "reject",
                 on_batch: Optional[Callable[[BatchRecord], None]] = None):
        if max_batch_size < 1 or max_queue_size < 1 or instances < 1:
            raise ValueError("max_batch_size, max_queue_size and instances must be positive")
        if timeout_action not in ("reject", "delay"):
            raise ValueError(f"timeout_action must be 'reject' or 'delay', got {timeout_action!r}")
        if priority_levels < 0 or (default_priority is not None and not 1 <= default_priority <= max(priority_levels, 1)):
            raise ValueError(f"default_priority must lie in 1..priority_levels={priority_levels}")
        if any(not 1 <= p <= max_batch_size for p in preferred_batch_sizes):
            raise ValueError(f"preferred_batch_sizes must lie in 1..max_batch_size={max_batch_size}")
        self.run_batch = run_batch
        self.max_batch_size, self.delay_s = max_batch_size, timeout_ms / 1000
        self.preferred = sorted(set(preferred_batch_sizes), reverse=True)
        self.max_queue_size, self.default_timeout_ms = max_queue_size, default_timeout_ms
        self.pad_values = dict(pad_values or {})
        self.instances = instances
        self.combine = combine
        self.priority_levels = priority_levels
        self.default_priority = default_priority or (priority_levels + 1) // 2 or 1
        self.on_batch = on_batch
        self.delay_expired = timeout_action == "delay"  # Triton's DELAY: expired requests wait behind the rest
        self._seq = 0
        self._busy = 0  # batches executing now
        self._computing = 0  # requests inside those batches (ds_inference_requests_running)
        self._recent_rows, self._idle_since = 1.0, 0.0
        self._recent_requests = 1.0  # moving average of requests per batch: ~1 means light load (module docs)
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(instances, thread_name_prefix="batcher")
        self._owns_executor = executor is None
        self._queue: collections.deque[_Request] = collections.deque()
        self._wakeup: Optional[asyncio.Event] = None
        self._slots: Optional[asyncio.Semaphore] = None
        self._running: set[asyncio.Future] = set()
        self._loop_task: Optional[asyncio.Task] = None
        self._closing = False
        self.stats = BatcherStats()

    # -- the caller's side ---------------------------------------------------------------------------

    async def submit(self, inputs: Inputs, *, timeout_ms: Optional[float] = None, priority: Optional[int] = None,
                     trace: Optional[RequestTrace] = None) -> Outputs:
        """Queue ``inputs`` (tensors sharing a leading batch dimension) and wait for their outputs.

        ``timeout_ms`` may shorten the batcher's default deadline, never extend it; ``priority`` is 1 (highest)
        to ``priority_levels``; ``trace`` (optional) receives the queue and compute times."""
        if self._closing:
            raise BatcherClosedError("the batcher is shutting down")
        self._ensure_started()
        if self.combine:
            rows = _rows(inputs)
            if rows > self.max_batch_size:
                raise ValueError(f"request has {rows} rows; the maximum batch size is {self.max_batch_size}")
        else:
            rows = 1
        if priority is None:
            priority = self.default_priority
        elif isinstance(priority, bool) or not isinstance(priority, int) or \
                not 1 <= priority <= max(self.priority_levels, 1):
            raise ValueError(f"priority must be an integer in 1..{max(self.priority_levels, 1)}, got {priority!r}")
        if timeout_ms is not None and timeout_ms <= 0:
            raise ValueError(f"timeout must be positive, got {timeout_ms!r}")
        if len(self._queue) >= self.max_queue_size:
            self._prune()  # expired or abandoned entries must not hold places while the model is busy
        if len(self._queue) >= self.max_queue_size:
            self.stats.rejected += 1
            raise QueueFullError(f"queue full ({self.max_queue_size} requests waiting)")
        if self.default_timeout_ms is not None:
            timeout_ms = self.default_timeout_ms if timeout_ms is None else min(timeout_ms, self.default_timeout_ms)
        now = time.monotonic()
        self._seq += 1
        request = _Request(inputs, rows, self._signature(inputs) if self.combine else (),
                           asyncio.get_running_loop().create_future(), now,
                           now + timeout_ms / 1000 if timeout_ms is not None else None, priority, self._seq, trace)
        self._queue.append(request)
        self.stats.requests += 1
        self._wakeup.set()
        try:
            if request.deadline is None or self.delay_expired:
                return await request.future
            return await asyncio.wait_for(asyncio.shield(request.future), request.deadline - now)
        except asyncio.TimeoutError:
            request.future.cancel()  # still queued: dropped before compute; running: result discarded
            self.stats.expired += 1
            raise DeadlineExceededError(f"request not served within {timeout_ms:g} ms") from None
        except asyncio.CancelledError:
            request.future.cancel()  # the caller went away: never compute it
            raise

    @property
    def queue_size(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> int:
        """Batches executing now (at most ``instances``)."""
        return self._busy

    @property
    def requests_running(self) -> int:
        """Requests inside the batches executing now (queued ones are :attr:`queue_size`)."""
        return self._computing

    async def stop(self, drain: bool = True) -> None:
        """Stop taking requests; with ``drain`` finish every queued and running one first."""
        self._closing = True
        if not drain:
            while self._queue:
                self._queue.popleft().future.cancel()
        if self._loop_task is not None:
            self._wakeup.set()
            await self._loop_task
            self._loop_task = None
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        if self._owns_executor:
            self._executor.shutdown(wait=True)

    # -- the batching loop ---------------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._loop_task is None:
            self._wakeup = asyncio.Event()
            self._slots = asyncio.Semaphore(self.instances)
            self._loop_task = asyncio.get_running_loop().create_task(self._loop(), name="dynamic-batcher")

    def _signature(self, inputs: Inputs) -> tuple:
        # Requests batch together when every input agrees on dtype and on the shape past the batch dimension;
        # inputs with a pad value only need the same number of dimensions.
        return tuple(sorted((name, t.dtype, t.dim() if name in self.pad_values else tuple(t.shape[1:]))
                            for name, t in inputs.items()))

    def _prune(self) -> None:
        """Drop requests whose caller gave up, and fail those past their deadline, before they cost compute."""
        now = time.monotonic()
        expire = not self.delay_expired
        if not any(r.future.done() or (expire and r.deadline is not None and now >= r.deadline) for r in self._queue):
            return  # the common case: nothing to drop, no new deque
        kept = collections.deque()
        for request in self._queue:
            if request.future.done():  # cancelled by its caller or timed out in submit()
                self.stats.dropped += 1
            elif expire and request.deadline is not None and now >= request.deadline:
                request.future.set_exception(DeadlineExceededError("request expired in the queue"))
                self.stats.dropped += 1
            else:
                kept.append(request)
        self._queue = kept

    def _ordered(self) -> None:
        # Highest priority first, FIFO within a level (only needed when levels are in use); with
        # timeout_action "delay", requests past their deadline go behind every unexpired one.
        if self.priority_levels > 1:
            self._queue = collections.deque(sorted(self._queue, key=lambda r: (r.priority, r.seq)))
        if self.delay_expired:
            now = time.monotonic()
            self._queue = collections.deque(sorted(self._queue, key=lambda r: r.deadline is not None and
                                                   now >= r.deadline))  # stable: the order above is kept

    def _ready_rows(self) -> int:
        if not self.combine:
            return 1
        head = self._queue[0].signature
        return sum(r.rows for r in self._queue if r.signature == head)

    def _target_size(self, available: int, waited_out: bool) -> Optional[int]:
        """How many rows to cut now, or None to keep waiting for more."""
        if available >= self.max_batch_size or not self.combine:
            return self.max_batch_size
        for size in self.preferred:
            if available >= size:
                return size
        # Light load (recent batches of about one request) and an idle model: waiting would only add latency.
        light = self._recent_requests < 1.5 and self._busy == 0
        if not light and not self._closing and self._busy == 0:
            # Busy traffic and an idle model: half a recent batch is worth starting now rather than letting the
            # model wait for the rest (a saturated closed loop settles into two half batches in flight instead
            # of one full batch and an idle refill); less waits for company, up to the delay since it went idle.
            if available >= self._recent_rows / 2:
                return available
            if time.monotonic() - self._idle_since < self.delay_s:
                return None
        return available if waited_out or light or self._closing else None

    def _cut(self, size: int) -> list[_Request]:
        # The oldest request always goes (even when larger than a preferred size), then whatever fits behind it.
        first = self._queue.popleft()
        if not self.combine:
            return [first]
        head, batch, rows, rest = first.signature, [first], first.rows, collections.deque()
        for request in self._queue:
            if request.signature == head and rows + request.rows <= size:
                batch.append(request)
                rows += request.rows
            else:
                rest.append(request)
        self._queue = rest
        return batch

    async def _loop(self) -> None:
        while True:
            self._prune()
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Take an executor slot first: while the model is busy the queue keeps filling, and the batch is
            # formed from everything that is there once it can actually run.
            await self._slots.acquire()
            cut = False
            try:
                while True:
                    self._prune()
                    if not self._queue:
                        break
                    self._ordered()
                    now = time.monotonic()
                    waited = now - self._queue[0].enqueued
                    size = self._target_size(self._ready_rows(), waited >= self.delay_s)
                    if size is not None:
                        batch = self._cut(min(size, self._ready_rows()))
                        cut = True
                        break
                    self._wakeup.clear()
                    try:  # woken early by a new request, or when the oldest one has waited long enough
                        await asyncio.wait_for(self._wakeup.wait(), max(self.delay_s - waited,
                                                                        self._idle_since + self.delay_s - now, 1e-4))
                    except asyncio.TimeoutError:
                        pass
            finally:
                if not cut:
                    self._slots.release()
            if cut:
                self._dispatch(batch)

    def _dispatch(self, batch: list[_Request]) -> None:
        """Hand the batch to the executor right away (no task hop); :meth:`_complete` runs when it is done."""
        started = time.monotonic()
        rows = sum(r.rows for r in batch)
        self._recent_requests += 0.25 * (len(batch) - self._recent_requests)
        self._recent_rows += 0.25 * (rows - self._recent_rows)
        self._busy += 1
        self._computing += len(batch)
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter_ns()
        try:
            inputs = self._concatenate(batch) if self.combine else batch[0].inputs
        except Exception as exc:  # e.g. inputs that cannot be padded together: this batch fails, serving goes on
            failed = loop.create_future()
            failed.set_exception(exc)
            self._complete(batch, rows, started, 0, failed)
            return
        input_ns = time.perf_counter_ns() - t0
        self.stats.batches += 1
        self.stats.rows += rows
        self.stats.batch_sizes[rows] += 1
        future = asyncio.wrap_future(self._executor.submit(self._run, inputs), loop=loop)
        self._running.add(future)
        future.add_done_callback(lambda f: self._complete(batch, rows, started, input_ns, f))

    def _complete(self, batch: list[_Request], rows: int, started: float, input_ns: int,
                  future: asyncio.Future) -> None:
        self._running.discard(future)
        # Free the executor and wake the batching loop before answering anyone: the loop then runs before the
        # requests' handlers and the model starts on the next batch while this one's answers go out.
        self._busy -= 1
        self._computing -= len(batch)
        if not self._busy:
            self._idle_since = time.monotonic()
        self._slots.release()
        self._wakeup.set()
        times = [input_ns, 0, 0]
        ok = False
        exc = future.exception()
        if exc is None:
            outputs, times[1] = future.result()
            t0 = time.perf_counter_ns()
            if self.combine:
                start = 0
                for request in batch:
                    part = {name: out[start:start + request.rows] for name, out in outputs.items()}
                    start += request.rows
                    if not request.future.done():
                        request.future.set_result(part)
            elif not batch[0].future.done():
                batch[0].future.set_result(outputs)
            times[2] = time.perf_counter_ns() - t0
            ok = True
        else:  # the model failed: every request of the batch gets the error, serving goes on
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(exc)
        for request in batch:
            if request.trace is not None:
                request.trace.queue_ns = int((started - request.enqueued) * 1e9)
                request.trace.compute_input_ns, request.trace.compute_infer_ns, \
                    request.trace.compute_output_ns = times
                request.trace.batch_size = rows
        if self.on_batch is not None:
            self.on_batch(BatchRecord(rows, len(batch), *times, ok))

    def _run(self, inputs: Inputs) -> tuple[Outputs, int]:
        t0 = time.perf_counter_ns()
        with torch.inference_mode():
            outputs = dict(self.run_batch(inputs))
        elapsed = time.perf_counter_ns() - t0
        if self.combine:
            rows = _rows(inputs)
            for name, out in outputs.items():
                if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != rows:
                    raise RuntimeError(f"output {name!r} must have the batch's {rows} rows first, got "
                                       f"{tuple(getattr(out, 'shape', ()))}")
        return outputs, elapsed

    def _concatenate(self, batch: list[_Request]) -> dict[str, torch.Tensor]:
        if len(batch) == 1:
            return dict(batch[0].inputs)
        merged = {}
        for name in batch[0].inputs:
            parts = [r.inputs[name] for r in batch]
            if name in self.pad_values:
                longest = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
                parts = [F.pad(p, [x for d in reversed(range(1, p.dim())) for x in (0, longest[d - 1] - p.shape[d])],
                               value=self.pad_values[name]) for p in parts]
            merged[name] = torch.cat(parts)
        return merged


def _rows(inputs: Inputs) -> int:
    if not inputs:
        raise ValueError("a request needs at least one input tensor")
    sizes = {name: t.shape[0] if isinstance(t, torch.Tensor) and t.dim() else None for name, t in inputs.items()}
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise ValueError(f"every input must be a tensor with the same leading batch dimension, got {sizes}")
    return next(iter(sizes.values()))
