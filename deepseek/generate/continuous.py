"""Continuous batching: iteration-level scheduling of many generation requests over one model.

Each iteration of the engine's loop (its own thread, so callers' event loops stay free):

1. drops requests that were cancelled or passed their deadline, freeing their cache slots at once;
2. runs one decoding step for every running sequence (one token each, one batched forward);
3. runs one chunk of the prompt of the next waiting request (chunked prefill: a long prompt is
   spread over several iterations, so running sequences keep receiving tokens meanwhile); when its
   last chunk is done the request joins the running batch with its first token.

Running sequences occupy cache slots ``0..n-1`` of a :class:`~deepseek.nn.SlotKVCache` (a finished
sequence's slot is filled by moving the last one into it), so a decoding step reads the cache through
views; the prompt being prefilled has its own staging slot and is moved in when it joins. Limits:
``max_running`` sequences, ``max_batched_tokens`` tokens per iteration (decode rows + prefill chunk),
and a bounded waiting queue (:class:`QueueFullError` beyond ``max_queue``).

Every request has its own sampling parameters and seed; greedy outputs do not depend on what else
is in the batch. Each request carries a :class:`~deepseek.generate.sequence.SequenceState` (stops, length,
text, logprobs), the same per-sequence logic as ``generate``'s. Events (text deltas, token ids,
log-probabilities, the finish reason) go to each request's callback from the engine thread.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, TypeVar, Union

import torch
from tokenizers import Tokenizer

from deepseek.errors import QueueFullError
from deepseek.generate.engine import GenerationOutput
from deepseek.generate.params import SamplingParams
from deepseek.generate.sampling import Sampler
from deepseek.generate.sequence import (Prompt, SequenceState, TokenLogprob, check_prompt_ids, encode_prompts,
                                        sampling_vocab_size, token_logprobs)
from deepseek.generate.threads import release_openmp_pool
from deepseek.nn.multi_lora import adapter_names, row_adapters
from deepseek.nn.slot_cache import SlotKVCache

logger = logging.getLogger(__name__)
T = TypeVar("T")


class EngineStoppedError(RuntimeError):
    """The engine is stopping or stopped and takes no new requests."""


@dataclass
class GenerationEvent:
    """What one request receives: a text delta per token, and a last event with ``finish_reason``.

    ``finish_reason`` is ``stop`` (stop token or string), ``length`` (max tokens or cache capacity),
    ``abort`` (cancelled), ``timeout`` (deadline passed) or ``error`` (the model raised: the engine ended every
    request and refuses new ones; ``error`` says why); the last event also carries the counts.
    """

    request_id: str
    delta: str = ""
    token_id: Optional[int] = None
    logprob: Optional[TokenLogprob] = None
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Optional[str] = None  # with finish_reason "error": the engine failed and ended every request


EventCallback = Callable[[GenerationEvent], None]


@dataclass
class EngineStats:
    running: int
    waiting: int
    max_running: int
    kv_cache_utilization: float
    kv_cache_bytes: int
    steps: int
    tokens_generated: int


@dataclass(eq=False)
class GenerationRequest:
    """A submitted request (its sequence, and how it is delivered); :meth:`cancel` frees its slot on the engine's
    next iteration. ``finish_reason`` is also ``abort`` or ``timeout``, which end a request, not its sequence."""

    request_id: str
    seq: SequenceState
    on_event: EventCallback
    deadline: Optional[float]  # time.monotonic() seconds
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    finished: bool = False
    finish_reason: Optional[str] = None
    first_token_at: Optional[float] = None
    prefilled: int = 0  # prompt tokens already in the cache
    adapter: Optional[str] = None  # the LoRA adapter its rows use (None: the base model)
    adapter_index: int = -1  # its index in the model's MultiLoRALinear layers (-1: base)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def prompt_ids(self) -> list[int]:
        return self.seq.prompt_ids

    @property
    def params(self) -> SamplingParams:
        return self.seq.params

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Change:
    """A :meth:`ContinuousBatchingEngine.between_steps` call waiting for the engine thread."""

    change: Callable[[set[int]], object]
    result: object = None
    error: Optional[BaseException] = None
    done: threading.Event = field(default_factory=threading.Event)


class ContinuousBatchingEngine:
    """Serve many generation requests at once on one model (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, *, max_running: int = 16,
                 max_batched_tokens: int = 512, prefill_chunk: int = 256, max_queue: int = 256,
                 max_len: Optional[int] = None, name: str = "engine"):
        if max_running < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError("max_running and prefill_chunk must be >= 1, max_queue >= 0")
        if max_batched_tokens <= max_running:
            raise ValueError(f"max_batched_tokens ({max_batched_tokens}) must exceed max_running ({max_running}): "
                             "each iteration needs room for a prefill chunk besides the decode rows")
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.max_running, self.max_batched_tokens = max_running, max_batched_tokens
        self.prefill_chunk, self.max_queue = prefill_chunk, max_queue
        self.device = next(model.parameters()).device
        self.vocab = sampling_vocab_size(model, tokenizer)
        # Adapters served per row (deepseek.models.adapters.load_adapters): name -> index in the stacked weights.
        # Changed at run time only through between_steps ("" names an empty slot).
        self.adapters = {name: i for i, name in enumerate(adapter_names(model)) if name}
        # Slots 0..max_running-1 hold running sequences; the last one stages the prompt being prefilled.
        self.cache = SlotKVCache.for_model(model, max_running + 1, max_len)
        self.max_len = self.cache.max_len
        self._staging = max_running
        self._running: list[GenerationRequest] = []  # row i <-> cache slot i
        self._last_tokens: list[int] = []
        # Penalty state per slot, [slots, V], allocated once a request needs it; a Sampler sees the rows it samples.
        self._seen: Optional[torch.Tensor] = None  # tokens in the context, for repetition_penalty
        self._output_counts: Optional[torch.Tensor] = None  # tokens in the output, for presence/frequency penalties
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._prefilling: Optional[GenerationRequest] = None
        self._lock = threading.Condition()
        self._changes: list[_Change] = []  # run by the engine thread between iterations: see between_steps
        self._ids = itertools.count()
        self._stopping = False
        self.failure: Optional[str] = None  # why the engine thread stopped, if it failed
        self._thread: Optional[threading.Thread] = None
        self.steps = 0
        self.tokens_generated = 0
        # The engine thread runs the model from now on: an idle OpenMP pool left in this thread would make
        # the engine's pool sleep between parallel regions (3-4x slower small ops, see generate/threads.py).
        release_openmp_pool()

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> "ContinuousBatchingEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"ds-{self.name}", daemon=True)
            self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: Optional[float] = None) -> None:
        """Stop taking requests; with ``drain`` finish every accepted one first, else abort them."""
        with self._lock:
            self._stopping = True
            if not drain:
                for request in list(self._waiting) + self._running + [self._prefilling]:
                    if request is not None:
                        request.cancelled = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "ContinuousBatchingEngine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- submitting ---------------------------------------------------------------------------------

    def submit(self, prompt: Prompt, params: Union[SamplingParams, dict, None] = None, *,
               on_event: Optional[EventCallback] = None, timeout_s: Optional[float] = None,
               request_id: Optional[str] = None, adapter: Optional[str] = None) -> GenerationRequest:
        """Queue one prompt (text or token ids). Raises :class:`QueueFullError` when the queue is full,
        ``ValueError`` for a prompt that cannot fit or an ``adapter`` the model does not hold (see
        :attr:`adapters`; None = the base model); events go to ``on_event`` from the engine thread."""
        if params is None:
            params = SamplingParams()
        elif isinstance(params, dict):
            params = SamplingParams.from_dict(params)
        ids = encode_prompts(self.tokenizer, [prompt])[0]
        if len(ids) >= self.max_len:
            raise ValueError(f"prompt of {len(ids)} tokens leaves no room in the {self.max_len}-token context")
        check_prompt_ids(ids, self.model.config.vocab_size)
        # The room left in the slot also bounds max_new: a sequence never outgrows its slot.
        seq = SequenceState(ids, params, self.tokenizer, self.max_len - len(ids), self.device)
        request = GenerationRequest(request_id or f"{self.name}-{next(self._ids)}", seq,
                                    on_event or (lambda event: None),
                                    None if timeout_s is None else time.monotonic() + timeout_s,
                                    adapter=adapter)
        with self._lock:
            # Under the lock: between_steps may change the adapters, and the index must be the current one.
            if adapter is not None and adapter not in self.adapters:
                raise ValueError(f"unknown adapter {adapter!r}; this model serves {sorted(self.adapters) or 'none'}")
            request.adapter_index = self.adapters.get(adapter, -1)
            if self.failure is not None:
                raise EngineStoppedError(f"the engine stopped after an error: {self.failure}")
            if self._stopping:
                raise EngineStoppedError("the engine is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests waiting (max_queue={self.max_queue})")
            self._waiting.append(request)
            self._lock.notify_all()
        return request

    def generate(self, prompts: Sequence[Prompt], params: Union[SamplingParams, dict, None] = None
                 ) -> list[GenerationOutput]:
        """Submit prompts together and wait for all of them (a convenience over :meth:`submit`)."""
        texts: dict[str, list[str]] = {}
        requests = []
        for prompt in prompts:
            request = self.submit(prompt, params, on_event=lambda e: texts.setdefault(e.request_id, []).append(e.delta))
            requests.append(request)
        for request in requests:
            request.done.wait()
        if any(r.finish_reason == "error" for r in requests):
            raise EngineStoppedError(f"the engine stopped after an error: {self.failure}")
        return [GenerationOutput("".join(texts.get(r.request_id, [])), list(r.token_ids),
                                 r.finish_reason or "length", len(r.prompt_ids)) for r in requests]

    def between_steps(self, change: Callable[[set[int]], T]) -> T:
        """Run ``change(adapter indices of the queued and running requests)`` while no iteration runs and no
        request is being queued, and return its result (or raise its exception): the place to swap the model's
        adapter layers and :attr:`adapters` (the serving backend's run-time adapter load/unload). The engine
        thread runs it before its next iteration (inline when that thread is not running). A running request
        keeps its index for its whole life, so ``change`` must keep those slots' weights."""
        pending = _Change(change)
        with self._lock:
            self._changes.append(pending)
            self._lock.notify_all()
        while not pending.done.wait(0.05):  # the engine thread may have stopped (or never started) meanwhile
            if self._thread is None or not self._thread.is_alive():
                with self._lock:
                    self._run_changes()
        if pending.error is not None:
            raise pending.error
        return pending.result

    def _run_changes(self) -> None:
        """Run the queued :meth:`between_steps` changes (holding ``_lock``, between iterations)."""
        changes, self._changes = self._changes, []
        live = [*self._waiting, *self._running, self._prefilling]
        in_use = {r.adapter_index for r in live if r is not None and r.adapter_index >= 0}
        for pending in changes:
            try:
                with torch.inference_mode(False):  # new weights are ordinary tensors, usable outside the engine too
                    pending.result = pending.change(in_use)
            except Exception as exc:  # noqa: BLE001 - handed to the caller of between_steps
                pending.error = exc
            pending.done.set()

    def stats(self) -> EngineStats:
        with self._lock:
            waiting = len(self._waiting) + (self._prefilling is not None)
            return EngineStats(len(self._running), waiting, self.max_running, self.cache.utilization(),
                               self.cache.bytes, self.steps, self.tokens_generated)

    # -- the loop -----------------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (self._running or self._waiting or self._prefilling or self._stopping
                               or self._changes):
                        self._lock.wait()
                    self._run_changes()
                    if self._stopping and not (self._running or self._waiting or self._prefilling):
                        return
                try:
                    self._drop_abandoned()
                    if self._running:
                        self._decode_step()
                    self._prefill_step()
                except Exception as exc:  # noqa: BLE001 - a dead engine thread must not leave requests waiting
                    self._fail(exc)
                    return

    def _drop_abandoned(self) -> None:
        now = time.monotonic()

        def reason(request: GenerationRequest) -> Optional[str]:
            if request.cancelled:
                return "abort"
            if request.deadline is not None and now > request.deadline:
                return "timeout"
            return None

        with self._lock:
            kept = collections.deque()
            for request in self._waiting:
                why = reason(request)
                if why:
                    self._finish(request, why)
                else:
                    kept.append(request)
            self._waiting = kept
        if self._prefilling is not None and reason(self._prefilling):
            self._finish(self._prefilling, reason(self._prefilling))
            self.cache.reset(self._staging)
            self._prefilling = None
        for row in reversed(range(len(self._running))):
            why = reason(self._running[row])
            if why:
                self._finish(self._running[row], why)
                self._remove_row(row)

    def _decode_step(self) -> None:
        n = len(self._running)
        ids = torch.tensor(self._last_tokens, device=self.device).unsqueeze(1)
        with self._row_adapters(self._running):
            logits = self.model(ids, cache=self.cache.bind(0, n), logits_to_keep=1)[:, -1]
        self.steps += 1
        tokens = self._sample(logits, 0, self._running)
        finished = []
        for row, request in enumerate(self._running):
            token, logprob = tokens[row]
            self._last_tokens[row] = token
            if self._emit(request, token, logprob):
                finished.append(row)
        for row in reversed(finished):
            self._remove_row(row)

    def _prefill_step(self) -> None:
        if self._prefilling is None:
            with self._lock:
                if not self._waiting or len(self._running) >= self.max_running:
                    return
                self._prefilling = self._waiting.popleft()
            self.cache.reset(self._staging)
        request = self._prefilling
        budget = max(1, self.max_batched_tokens - len(self._running))
        chunk = min(self.prefill_chunk, budget, len(request.prompt_ids) - request.prefilled)
        ids = torch.tensor(request.prompt_ids[request.prefilled:request.prefilled + chunk], device=self.device)
        with self._row_adapters([request]):
            logits = self.model(ids.unsqueeze(0), cache=self.cache.bind(self._staging, 1), logits_to_keep=1)[:, -1]
        request.prefilled += chunk
        if request.prefilled < len(request.prompt_ids):
            return
        # The whole prompt is in the cache: join the running batch with the first token.
        self._prefilling = None
        row = len(self._running)
        self.cache.move(self._staging, row)
        self._running.append(request)
        self._last_tokens.append(0)
        self._start_penalty_state(row, request.seq)
        (token, logprob), = self._sample(logits, row, [request])
        self._last_tokens[row] = token
        if self._emit(request, token, logprob):
            self._remove_row(row)

    # -- pieces -------------------------------------------------------------------------------------

    def _row_adapters(self, requests: list[GenerationRequest]):
        """Each row's adapter for the next forward (one small host-to-device copy), if a row uses one: a batch of
        base rows alone skips the low-rank products (as if no adapter were loaded)."""
        if all(r.adapter_index < 0 for r in requests):
            return contextlib.nullcontext()
        ids_B = torch.tensor([r.adapter_index for r in requests], device=self.device)
        return row_adapters(self.model, ids_B)

    def _start_penalty_state(self, row: int, seq: SequenceState) -> None:
        """A sequence joins at ``row``: its penalty state starts from its prompt (rows of sequences without the
        penalty are left as they are: a penalty of 1 or 0 reads nothing from them)."""
        params = seq.params
        if params.repetition_penalty != 1.0:
            if self._seen is None:
                self._seen = torch.zeros(self.cache.n_slots, self.vocab, dtype=torch.bool, device=self.device)
            self._seen[row] = False
            self._seen[row, torch.tensor(seq.prompt_ids, device=self.device).clamp(0, self.vocab - 1)] = True
        if params.presence_penalty or params.frequency_penalty:
            if self._output_counts is None:
                self._output_counts = torch.zeros(self.cache.n_slots, self.vocab, dtype=torch.int32,
                                                  device=self.device)
            self._output_counts[row].zero_()

    def _sample(self, logits_BV: torch.Tensor, first_row: int, requests: list[GenerationRequest]
                ) -> list[tuple[int, Optional[TokenLogprob]]]:
        """The next token (and its logprobs, if asked) of the requests in rows ``first_row ..``."""
        rows = slice(first_row, first_row + len(requests))
        seqs = [r.seq for r in requests]
        sampler = Sampler([s.params for s in seqs], self.vocab, self.device, generators=[s.generator for s in seqs],
                          output_counts=None if self._output_counts is None else self._output_counts[rows],
                          seen=None if self._seen is None else self._seen[rows])
        chosen = sampler(logits_BV)
        sampler.record_output(chosen)  # into the slots' penalty state (views)
        tokens = chosen.tolist()
        return list(zip(tokens, token_logprobs(logits_BV, tokens, seqs, self.vocab)))

    def _emit(self, request: GenerationRequest, token: int, logprob: Optional[TokenLogprob]) -> bool:
        """Account for one new token; returns True when the request is finished."""
        if request.first_token_at is None:
            request.first_token_at = time.monotonic()
        self.tokens_generated += 1
        delta, reason = request.seq.append(token)
        event = GenerationEvent(request.request_id, delta, token, logprob, reason, len(request.prompt_ids),
                                len(request.token_ids))
        self._deliver(request, event)
        if reason is not None:
            self._mark_finished(request, reason)
            return True
        return False

    def _finish(self, request: GenerationRequest, reason: str) -> None:
        """End a request that produces no further token (cancelled, timed out)."""
        self._deliver(request, GenerationEvent(request.request_id, "", None, None, reason, len(request.prompt_ids),
                                               len(request.token_ids)))
        self._mark_finished(request, reason)

    def _fail(self, exc: Exception) -> None:
        """The model (or the engine) raised: end every accepted request with ``error`` and refuse new ones."""
        logger.exception("generation engine %r failed; ending every request", self.name)
        with self._lock:
            self.failure, self._stopping = f"{type(exc).__name__}: {exc}", True
            requests = [*self._running, *([self._prefilling] if self._prefilling else []), *self._waiting]
            self._running, self._last_tokens, self._prefilling = [], [], None
            self._waiting.clear()
        for request in requests:
            self._deliver(request, GenerationEvent(request.request_id, "", None, None, "error",
                                                   len(request.prompt_ids), len(request.token_ids), self.failure))
            self._mark_finished(request, "error")

    def _mark_finished(self, request: GenerationRequest, reason: str) -> None:
        request.finished, request.finish_reason = True, reason
        request.done.set()

    @staticmethod
    def _deliver(request: GenerationRequest, event: GenerationEvent) -> None:
        try:
            request.on_event(event)
        except Exception:  # a consumer's failure must not stop the engine; treat it as a disconnect
            request.cancelled = True

    def _remove_row(self, row: int) -> None:
        """Free a running row's slot: the last running sequence moves into it (slots stay 0..n-1)."""
        last = len(self._running) - 1
        if row != last:
            self.cache.move(last, row)
            self._running[row] = self._running[last]
            self._last_tokens[row] = self._last_tokens[last]
            for state in (self._seen, self._output_counts):
                if state is not None:
                    state[row] = state[last]
        self.cache.reset(last)
        self._running.pop()
        self._last_tokens.pop()
