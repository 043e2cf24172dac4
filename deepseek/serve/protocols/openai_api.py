"""OpenAI-compatible text generation, and KServe v2's generate extension, as a FastAPI router.

    GET  /v1/models                      the language, embedding and retrieval models with their versions
    POST /v1/completions                 prompt(s) -> text; ``stream: true`` gives server-sent events
    POST /v1/chat/completions            messages -> assistant message (chat template from the tokenizer)
    POST /v2/models/{m}[/versions/{v}]/generate          {"text_input", "parameters"} -> {"text_output"}
    POST /v2/models/{m}[/versions/{v}]/generate_stream   the same as server-sent events, one per token

``model`` is a model name (the routing policy picks the version, as for inference) or ``name/version``, either
followed by ``:adapter`` for one of the LoRA adapters its ``config.yaml`` lists (``/v1/models`` lists each as
``name:adapter`` with ``parent`` = name, as vLLM does; KServe generate takes ``parameters.adapter`` or the
model ``name:adapter`` in its path). Rows of
different adapters share one continuous batch (:mod:`deepseek.nn.multi_lora`).
Requests run on the version's continuous batching engine (:mod:`deepseek.generate.continuous`); a client
that disconnects cancels its request, which frees its slot on the engine's next step. Errors use OpenAI's
shape ``{"error": {"message", "type", "param", "code"}}`` with the status of :mod:`deepseek.serve.errors`:
400 malformed (also a prompt plus an explicit ``max_tokens`` beyond the model's context), 404 unknown model,
429 queue full (with ``Retry-After``), 503 unavailable. Parameters beyond OpenAI's: ``top_k``,
``repetition_penalty``, ``ignore_eos``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional, Sequence

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from deepseek.config import ConfigError
from deepseek.data.chat import ROLES, chat_template
from deepseek.generate.continuous import ContinuousBatchingEngine, EngineStoppedError, GenerationEvent
from deepseek.generate.engine import Prompt, encode_prompts
from deepseek.generate.params import SamplingParams
from deepseek.serve.errors import NOT_FOUND, UNAVAILABLE, RequestError, error_kind
from deepseek.serve.manager import ModelVersion
from deepseek.serve.protocols.http_context import (access_logged, log_access, read_json_object, refuse_unknown_fields,
                                                  select_named_version, serving)
from deepseek.serve.protocols.http_errors import OpenAIRoute

MAX_N = 16
_COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop",
                  "presence_penalty", "frequency_penalty", "seed", "user", "logit_bias", "top_k",
                  "repetition_penalty", "ignore_eos"}
COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "logprobs", "echo", "best_of", "suffix"}
CHAT_FIELDS = _COMMON_FIELDS | {"messages", "logprobs", "top_logprobs", "max_completion_tokens", "response_format",
                                "tools", "tool_choice", "parallel_tool_calls"}
INT64 = (-(2 ** 63), 2 ** 63 - 1)

router = APIRouter(route_class=OpenAIRoute)


# -- request parsing ---------------------------------------------------------------------------------------

def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError(f"'{name}' must be a number in [{low}, {high}], got {value!r}", param=name)
    return float(value)


def _integer(body: dict, name: str, default: Optional[int], low: int, high: Optional[int] = None) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise RequestError(f"'{name}' must be {bound}, got {value!r}", param=name)
    return value


def _boolean(body: dict, name: str, param: Optional[str] = None) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"'{name}' must be a boolean, got {value!r}", param=param or name)
    return value


def _check_fields(body: dict, allowed: set[str]) -> None:
    refuse_unknown_fields(body, allowed)
    if body.get("logit_bias"):
        raise RequestError("'logit_bias' is not supported", param="logit_bias")


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise RequestError("'stop' must be a non-empty string or a list of up to 4 of them", param="stop")
    return stops


def sampling_params(body: dict, max_tokens: Optional[int], logprobs: Optional[int]) -> SamplingParams:
    """The engine's parameters from an OpenAI request body (OpenAI's defaults: temperature 1, 16 tokens)."""
    try:
        return SamplingParams(
            max_new_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1e-9, top_k=_integer(body, "top_k", 0, 0),
            repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.01, 10.0),
            presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            stop=_stop(body), ignore_eos=_boolean(body, "ignore_eos"),
            seed=_integer(body, "seed", None, -(2 ** 63), 2 ** 63 - 1), logprobs=logprobs)
    except ConfigError as exc:
        raise RequestError(str(exc)) from None


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or (options and not stream):
        raise RequestError("'stream_options' is an object and is only allowed with stream: true",
                           param="stream_options")
    return stream, _boolean(options, "include_usage", "stream_options")


def _prompts(body: dict) -> list:
    """Completions' ``prompt``: a string, a list of strings, a list of token ids, or a list of those."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [prompt]
        if all(isinstance(p, str) for p in prompt) or all(
                isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
                for p in prompt):
            return list(prompt)
    raise RequestError("'prompt' must be a string, a list of strings, a list of token ids, or a list of "
                       "token-id lists (non-empty)", param="prompt")


def _message_text(message: Any, i: int) -> tuple[str, str]:
    role = message.get("role") if isinstance(message, dict) else None
    if not isinstance(role, str) or role not in ROLES:  # a JSON object as the role is unhashable
        raise RequestError(f"messages[{i}] must be an object with role system, user or assistant",
                           param=f"messages[{i}]")
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text ones can be served by a text model
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise RequestError(f"messages[{i}].content: only text parts are supported", param=f"messages[{i}].content")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RequestError(f"messages[{i}].content must be a string or a list of text parts",
                           param=f"messages[{i}].content")
    return role, content


def chat_prompt(tokenizer, messages: Any) -> tuple[str, list[int], list[str]]:
    """The prompt text for ``messages``, plus the stop token ids and stop strings that end the reply.

    The tokenizer's chat template renders it (:mod:`deepseek.data.chat`, shared with SFT): role tokens
    ``<|user|>text<|end|>...<|assistant|>`` ending at ``<|end|>``, or a plain ``User: ...`` transcript.
    """
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    turns = [_message_text(m, i) for i, m in enumerate(messages)]
    template = chat_template(tokenizer)
    return template.render(turns), list(template.stop_token_ids), list(template.stop_strings)


# -- running requests ----------------------------------------------------------------------------------------

@dataclass
class _Choice:
    index: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    text: list[str] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: Optional[str] = None
    last_token_at: Optional[float] = None
    first_token_s: Optional[float] = None  # since the API request arrived


class _Mailbox:
    """Hands events from the engine thread to one event loop, one wake-up for everything posted meanwhile.

    A decoding step emits one event per running sequence; waking the loop once per step instead of once per
    token (``call_soon_threadsafe`` writes its self-pipe each time) leaves the GIL to the engine more often.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[tuple[asyncio.Queue, Any]] = []

    def post(self, queue: asyncio.Queue, item: Any) -> None:
        with self.lock:
            self.pending.append((queue, item))
            first = len(self.pending) == 1
        if first:
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        for queue, item in pending:
            queue.put_nowait(item)


_mailboxes: dict[asyncio.AbstractEventLoop, _Mailbox] = {}


def _mailbox(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    box = _mailboxes.get(loop)
    if box is None:
        _mailboxes.clear()  # one serving loop at a time; a new one (a restarted server) replaces the old
        box = _mailboxes[loop] = _Mailbox(loop)
    return box


class _Run:
    """The engine requests behind one API request, their events funnelled into one asyncio queue."""

    def __init__(self, engine: ContinuousBatchingEngine, mv: ModelVersion, metrics, started: float,
                 adapter: Optional[str] = None, request: Optional[Request] = None, route: str = ""):
        self.engine, self.mv, self.metrics, self.started = engine, mv, metrics, started
        self.request, self.route = request, route  # for the access-log line :meth:`log` writes
        self.adapter = adapter  # the LoRA adapter every choice runs with (None: the base model)
        self.mailbox = _mailbox(asyncio.get_running_loop())
        self.queue: asyncio.Queue = asyncio.Queue()
        self.requests: list = []
        self.choices: list[_Choice] = []
        self.pending = 0

    def submit(self, prompt_ids: list[int], params: SamplingParams, extra_stop_ids: Sequence[int] = ()) -> None:
        """Queue one choice (:func:`prompt_ids` gives the ids); the engine's refusals go to the error table."""
        if extra_stop_ids:
            params = dataclasses.replace(params, stop_token_ids=[*params.stop_token_ids, *extra_stop_ids])
        index = len(self.choices)
        choice = _Choice(index)
        self.choices.append(choice)

        def deliver(event: GenerationEvent) -> None:  # engine thread
            self.mailbox.post(self.queue, (choice, event))

        try:
            self.requests.append(self.engine.submit(prompt_ids, params, on_event=deliver, adapter=self.adapter))
        except ValueError as exc:  # token ids outside the vocabulary
            raise RequestError(f"{exc} (context: {self.engine.max_len} tokens)", param="prompt") from None
        self.pending += 1

    def submit_all(self, prompts: Sequence[list[int]], params: SamplingParams, n: int,
                   extra_stop_ids: Sequence[int] = ()) -> None:
        """``n`` choices per prompt; when one is refused (a full queue), the ones queued already are cancelled."""
        try:
            for ids in prompts:
                for j in range(n):
                    self.submit(ids, _nth_choice(params, j), extra_stop_ids)
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()

    async def events(self) -> AsyncIterator[tuple[_Choice, GenerationEvent]]:
        name, version = self.mv.name, self.mv.version
        while self.pending:
            choice, event = await self.queue.get()
            now = time.monotonic()
            choice.prompt_tokens = event.prompt_tokens
            if event.token_id is not None:
                choice.completion_tokens = event.completion_tokens
                previous = choice.last_token_at
                self.metrics.observe_token(name, version, None if previous is None else now - previous)
                if previous is None:
                    choice.first_token_s = now - self.started
                choice.last_token_at = now
            if event.error is not None:  # the engine failed and ended every request: 503, or an error chunk
                raise EngineStoppedError(f"generation failed: {event.error}")
            if event.finish_reason is not None:
                choice.finish_reason = event.finish_reason
                self.pending -= 1
                self.metrics.observe_generation(name, version, event.finish_reason, event.prompt_tokens,
                                                choice.first_token_s, now - self.started)
                if self.engine.adapters:
                    self.metrics.observe_adapter_generation(name, version, self.adapter, event.finish_reason,
                                                            event.completion_tokens)
            yield choice, event

    def log(self, status: Any) -> None:
        """The request's access-log line (once): tokens in and out, the first choice's time to first token."""
        if self.request is None:
            return
        first = [c.first_token_s for c in self.choices if c.first_token_s is not None]
        usage = self.usage()
        log_access(self.request, self.route, self.started, status, adapter=self.adapter, batch_size=len(self.choices),
                   tokens_in=usage["prompt_tokens"], tokens_out=usage["completion_tokens"],
                   ttft_ms=round(min(first) * 1000, 3) if first else None)

    def usage(self) -> dict:
        prompt = sum(c.prompt_tokens for c in self.choices)
        completion = sum(c.completion_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def prompt_ids(engine: ContinuousBatchingEngine, prompt: Prompt, max_tokens: Optional[int],
               max_tokens_param: str = "max_tokens") -> list[int]:
    """The prompt's token ids; 400 when the prompt fills the context, or when it and an explicit ``max_tokens``
    do not fit in it together (as the OpenAI API and vLLM answer; the engine would cut the reply short)."""
    try:
        ids = encode_prompts(engine.tokenizer, [prompt])[0]
    except ValueError as exc:  # an empty prompt and no BOS token
        raise RequestError(str(exc), param="prompt") from None
    if len(ids) >= engine.max_len:
        raise RequestError(f"prompt of {len(ids)} tokens leaves no room in the {engine.max_len}-token context",
                           param="prompt")
    if max_tokens is not None and len(ids) + max_tokens > engine.max_len:
        raise RequestError(f"this model's context is {engine.max_len} tokens, but {len(ids)} prompt tokens plus "
                           f"{max_tokens_param} {max_tokens} ask for {len(ids) + max_tokens}", param=max_tokens_param)
    return ids


def _nth_choice(params: SamplingParams, j: int) -> SamplingParams:
    """Choice ``j`` of ``n``: a seeded request gives each choice its own seed (seed, seed + 1, ...)."""
    return params if params.seed is None or j == 0 else dataclasses.replace(params, seed=params.seed + j)


def _finish_reason(reason: Optional[str]) -> Optional[str]:
    # OpenAI knows stop and length; a cancelled or timed-out request ends as "length" was not reached either
    return None if reason is None else reason if reason in ("stop", "length") else "stop"


def _sse(data: Any) -> bytes:
    return b"data: " + (data if isinstance(data, bytes) else orjson.dumps(data)) + b"\n\n"


# -- answering: one format per route, one way to stream or collect ---------------------------------------------

def token_text(engine: ContinuousBatchingEngine, token_id: int) -> str:
    return engine.tokenizer.decode([token_id], skip_special_tokens=False)


@dataclass
class _Answer:
    """What every generation answer carries; the subclasses shape the chunks and the whole answer."""

    run: _Run
    engine: ContinuousBatchingEngine
    model: str
    rid: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    object_name: str = ""
    include_usage: bool = False
    done_marker: bool = True  # OpenAI ends a stream with "data: [DONE]"; Triton's generate_stream does not

    def chunks(self, choice: _Choice, event: GenerationEvent) -> list[dict]:
        raise NotImplementedError

    def whole(self) -> dict:
        raise NotImplementedError

    def usage_chunk(self) -> dict:
        return {"id": self.rid, "object": self.object_name, "created": self.created, "model": self.model,
                "choices": [], "usage": self.run.usage()}


@dataclass
class CompletionAnswer(_Answer):
    logprobs: Optional[int] = None

    def __post_init__(self):
        self.rid, self.object_name = f"cmpl-{uuid.uuid4().hex}", "text_completion"

    def _base(self) -> dict:
        return {"id": self.rid, "object": self.object_name, "created": self.created, "model": self.model}

    def _logprobs(self, entries: list) -> Optional[dict]:
        if self.logprobs is None:
            return None
        tokens, offsets, text_len = [], [], 0
        for delta, lp in entries:
            tokens.append(token_text(self.engine, lp.token_id))
            offsets.append(text_len)
            text_len += len(delta)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for _, lp in entries],
                "top_logprobs": [{token_text(self.engine, t): v for t, v in lp.top} for _, lp in entries],
                "text_offset": offsets}

    def chunks(self, choice: _Choice, event: GenerationEvent) -> list[dict]:
        if not event.delta and event.finish_reason is None and event.logprob is None:
            return []
        lp = self._logprobs([(event.delta, event.logprob)]) if event.logprob is not None else None
        return [{**self._base(), "choices": [{"index": choice.index, "text": event.delta, "logprobs": lp,
                                              "finish_reason": _finish_reason(event.finish_reason)}]}]

    def whole(self) -> dict:
        return {**self._base(), "choices": [{"index": c.index, "text": "".join(c.text),
                                             "logprobs": self._logprobs(c.logprobs),
                                             "finish_reason": _finish_reason(c.finish_reason)}
                                            for c in self.run.choices],
                "usage": self.run.usage()}


@dataclass
class ChatAnswer(_Answer):
    want_logprobs: bool = False
    started_choices: set[int] = field(default_factory=set)

    def __post_init__(self):
        self.rid, self.object_name = f"chatcmpl-{uuid.uuid4().hex}", "chat.completion.chunk"

    def _logprob_entry(self, lp) -> dict:
        token = token_text(self.engine, lp.token_id)
        return {"token": token, "logprob": lp.logprob, "bytes": list(token.encode()),
                "top_logprobs": [{"token": (t := token_text(self.engine, i)), "logprob": v, "bytes": list(t.encode())}
                                 for i, v in lp.top]}

    def chunks(self, choice: _Choice, event: GenerationEvent) -> list[dict]:
        base = {"id": self.rid, "object": self.object_name, "created": self.created, "model": self.model}
        pieces = []
        if choice.index not in self.started_choices:
            self.started_choices.add(choice.index)
            pieces.append({**base, "choices": [{"index": choice.index, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
        if event.delta or event.logprob is not None:
            lp = {"content": [self._logprob_entry(event.logprob)]} if event.logprob is not None else None
            pieces.append({**base, "choices": [{"index": choice.index, "delta": {"content": event.delta},
                                                "logprobs": lp, "finish_reason": None}]})
        if event.finish_reason is not None:
            pieces.append({**base, "choices": [{"index": choice.index, "delta": {}, "logprobs": None,
                                                "finish_reason": _finish_reason(event.finish_reason)}]})
        return pieces

    def whole(self) -> dict:
        return {"id": self.rid, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": c.index,
                             "message": {"role": "assistant", "content": "".join(c.text)},
                             "logprobs": {"content": [self._logprob_entry(lp) for _, lp in c.logprobs]}
                             if self.want_logprobs else None,
                             "finish_reason": _finish_reason(c.finish_reason)} for c in self.run.choices],
                "usage": self.run.usage()}


@dataclass
class KServeGenerateAnswer(_Answer):
    done_marker: bool = False

    def _base(self) -> dict:
        return {"model_name": self.run.mv.name, "model_version": str(self.run.mv.version)}

    def chunks(self, choice: _Choice, event: GenerationEvent) -> list[dict]:
        if not event.delta and event.finish_reason is None:
            return []
        return [{**self._base(), "text_output": event.delta, "finish_reason": event.finish_reason}]

    def whole(self) -> dict:
        choice = self.run.choices[0]
        return {**self._base(), "text_output": "".join(choice.text), "finish_reason": choice.finish_reason,
                "usage": self.run.usage()}


async def _cancel_on_disconnect(request: Request, run: _Run) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            run.cancel()
            return


async def _sse_events(answer: _Answer) -> AsyncIterator[bytes]:
    finished = False
    try:
        try:
            async for choice, event in answer.run.events():
                for piece in answer.chunks(choice, event):
                    yield _sse(piece)
        except EngineStoppedError as exc:  # the status line is sent: the stream ends with an error event
            kind = error_kind(exc)  # OpenAI's error object; Triton's generate_stream sends {"error": message}
            answer.run.log(kind.http)
            yield _sse({"error": {"message": str(exc), "type": kind.openai, "code": kind.http}}
                       if answer.done_marker else {"error": str(exc)})
            finished = True
            return
        answer.run.log(200)  # before the last chunks: a client that has read [DONE] finds its line written
        if answer.include_usage:
            yield _sse(answer.usage_chunk())
        if answer.done_marker:
            yield _sse(b"[DONE]")
        finished = True
    finally:
        if not finished:  # the client went away (or the server is stopping): free the slots
            answer.run.cancel()
            answer.run.log(499)


async def respond(request: Request, answer: _Answer, stream: bool) -> Response:
    """Stream ``answer`` as server-sent events, or collect it and answer once."""
    if stream:
        return StreamingResponse(_sse_events(answer), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    run = answer.run
    watcher = asyncio.get_running_loop().create_task(_cancel_on_disconnect(request, run))
    try:
        async for choice, event in run.events():
            choice.text.append(event.delta)
            if event.logprob is not None:
                choice.logprobs.append((event.delta, event.logprob))
        run.log(200)
    finally:
        watcher.cancel()
        run.cancel()
    return Response(orjson.dumps(answer.whole()), media_type="application/json")


# -- parsing a request: the key, the body, the model ------------------------------------------------------------

async def _request_body(request: Request) -> dict:
    serving(request).check_inference_key(request.headers)
    body = await read_json_object(request)
    request.state.access_user = body.get("user")  # the access log's client when no routing header is sent
    return body


def language_model(request: Request, model: Any) -> tuple[ModelVersion, ContinuousBatchingEngine, Optional[str]]:
    """The version ``model`` (a name, or name/version, with ``:adapter`` for one of its LoRA adapters) names, its
    generation engine, and the adapter (None: the base model)."""
    if not isinstance(model, str) or not model:
        raise RequestError("'model' is required: a model name, or name/version", param="model")
    model, colon, adapter = model.partition(":")
    if colon and not adapter:
        raise RequestError(f"no adapter name after ':' in {model + colon!r}", param="model")
    mv, name = select_named_version(request, model)
    engine_of = getattr(mv.backend, "engine", None)
    if engine_of is None:
        raise RequestError(f"model {name!r} is not a language model (backend {mv.config.backend})", param="model")
    try:
        engine = engine_of()
    except Exception as exc:
        raise RequestError(f"model {name!r} cannot generate now: {exc}", UNAVAILABLE, param="model") from None
    if colon and adapter not in engine.adapters:
        served = ", ".join(sorted(engine.adapters)) or "none"
        raise RequestError(f"model {name!r} has no adapter {adapter!r} (it serves: {served})", NOT_FOUND,
                           param="model")
    return mv, engine, adapter or None


# -- the routes ------------------------------------------------------------------------------------------------

@router.get("/v1/models")
async def list_models(request: Request):
    ctx = serving(request)
    ctx.check_inference_key(request.headers)
    models: dict[str, list[str]] = {}
    adapters: dict[str, dict[str, list[str]]] = {}  # {model: {adapter: versions}}
    for name, version, mv in ctx.manager.snapshot():
        # language, embedding (POST /v1/embeddings) and retrieval (POST /v1/retrieve) models; tensor models have no
        # OpenAI-shaped route
        if mv.ready and (hasattr(mv.backend, "engine") or hasattr(mv.backend, "embedder")):
            models.setdefault(name, []).append(str(version))
            for adapter in getattr(mv.backend, "adapters", ()):
                adapters.setdefault(name, {}).setdefault(adapter, []).append(str(version))
    data = []
    for name, versions in sorted(models.items()):
        data.append({"id": name, "object": "model", "created": int(ctx.started_at), "owned_by": "deepseek",
                     "versions": sorted(versions, key=int)})
        # Each LoRA adapter as its own model whose parent is the base, as vLLM lists them.
        data += [{"id": f"{name}:{adapter}", "object": "model", "created": int(ctx.started_at),
                  "owned_by": "deepseek", "parent": name, "versions": sorted(vs, key=int)}
                 for adapter, vs in sorted(adapters.get(name, {}).items())]
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")


@router.get("/v1/models/{model:path}")
async def get_model(request: Request, model: str):
    from deepseek.serve.protocols.openai_embeddings import embedding_model, model_of_backend

    try:
        mv = embedding_model(request, model)
    except RequestError:  # not an embedding model: a retrieval model, a language model, or the latter's error
        try:
            mv = model_of_backend(request, model, "retrieval")
        except RequestError:
            mv, _, _ = language_model(request, model)
    answer = {"id": model, "object": "model", "created": int(serving(request).started_at), "owned_by": "deepseek",
              "version": str(mv.version)}
    if mv.config.backend == "retrieval":  # what the index holds and the request defaults
        answer["retrieval"] = mv.backend.describe()
    return Response(orjson.dumps(answer), media_type="application/json")


@router.post("/v1/completions")
@access_logged("openai/completions")
async def completions(request: Request):
    started = time.monotonic()
    body = await _request_body(request)
    _check_fields(body, COMPLETION_FIELDS)
    n = _integer(body, "n", 1, 1, MAX_N)
    if body.get("echo") or body.get("suffix") or body.get("best_of") not in (None, 1, n):
        raise RequestError("'echo', 'suffix' and a 'best_of' other than n are not supported")
    prompts = _prompts(body)
    stream, include_usage = _stream_flags(body)
    max_tokens = _integer(body, "max_tokens", None, 1)
    params = sampling_params(body, 16 if max_tokens is None else max_tokens,
                             _integer(body, "logprobs", None, 0, 20))
    mv, engine, adapter = language_model(request, body.get("model"))
    ids = [prompt_ids(engine, prompt, max_tokens) for prompt in prompts]
    run = _Run(engine, mv, serving(request).metrics, started, adapter, request, "openai/completions")
    run.submit_all(ids, params, n)
    answer = CompletionAnswer(run, engine, body["model"], include_usage=include_usage, logprobs=params.logprobs)
    return await respond(request, answer, stream)


@router.post("/v1/chat/completions")
@access_logged("openai/chat")
async def chat_completions(request: Request):
    started = time.monotonic()
    body = await _request_body(request)
    _check_fields(body, CHAT_FIELDS)
    if body.get("tools") or body.get("tool_choice") not in (None, "none"):
        raise RequestError("tool calling is not supported", param="tools")
    if body.get("response_format") not in (None, {"type": "text"}):
        raise RequestError("only response_format {'type': 'text'} is supported", param="response_format")
    n = _integer(body, "n", 1, 1, MAX_N)
    stream, include_usage = _stream_flags(body)
    want_logprobs = _boolean(body, "logprobs")
    top = _integer(body, "top_logprobs", 0, 0, 20)
    max_tokens, max_tokens_param = _integer(body, "max_completion_tokens", None, 1), "max_completion_tokens"
    if max_tokens is None:
        max_tokens, max_tokens_param = _integer(body, "max_tokens", None, 1), "max_tokens"
    mv, engine, adapter = language_model(request, body.get("model"))
    text, stop_ids, stop_strings = chat_prompt(engine.tokenizer, body.get("messages"))
    ids = prompt_ids(engine, text, max_tokens, max_tokens_param)
    params = sampling_params(body, max_tokens or engine.max_len, top if want_logprobs else None)
    if stop_strings:
        params = dataclasses.replace(params, stop=[*params.stop, *stop_strings])
    run = _Run(engine, mv, serving(request).metrics, started, adapter, request, "openai/chat")
    run.submit_all([ids], params, n, stop_ids)
    answer = ChatAnswer(run, engine, body["model"], include_usage=include_usage, want_logprobs=want_logprobs)
    return await respond(request, answer, stream)


def _generate_params(options: dict) -> SamplingParams:
    """KServe generate's ``parameters`` as sampling parameters (greedy unless asked otherwise)."""
    try:
        params = SamplingParams.from_dict({"temperature": 0.0, **options})
    except (ConfigError, TypeError, ValueError) as exc:
        raise RequestError(f"parameters: {exc}", param="parameters") from None
    # from_dict checks types and ranges; these would fail later, in the engine's thread or its sampler
    floats = (params.temperature, params.top_p, params.repetition_penalty, params.presence_penalty,
              params.frequency_penalty)
    if not all(math.isfinite(x) for x in floats):
        raise RequestError("parameters: sampling parameters must be finite numbers", param="parameters")
    if params.seed is not None and not INT64[0] <= params.seed <= INT64[1]:
        raise RequestError(f"parameters: seed must be a 64-bit integer, got {params.seed}", param="parameters")
    return params


async def _kserve_generate(request: Request, model: str, version: Optional[str], stream: bool) -> Response:
    started = time.monotonic()
    body = await _request_body(request)
    text = body.get("text_input")
    if not isinstance(text, str):
        raise RequestError("'text_input' (a string) is required", param="text_input")
    options = body.get("parameters") or {}
    if not isinstance(options, dict):
        raise RequestError("'parameters' must be an object", param="parameters")
    adapter = options.get("adapter")  # a LoRA adapter of the model, as "<model>:<adapter>" picks in OpenAI's routes
    options = {k: v for k, v in options.items() if k != "adapter"}
    if adapter is not None and (not isinstance(adapter, str) or not adapter):
        raise RequestError("parameters: adapter must be an adapter's name", param="parameters")
    name, colon, named = model.partition(":")  # "/v2/models/lm:a/..." names the adapter as OpenAI's model field
    if colon and adapter is not None:
        raise RequestError(f"the adapter is named twice: in the model {model!r} and in parameters.adapter "
                           f"{adapter!r}; give one", param="parameters")
    suffix = f":{adapter}" if adapter else colon + named
    mv, engine, adapter = language_model(request, (name if version is None else f"{name}/{version}") + suffix)
    params = _generate_params(options)
    asked = options.get("max_new_tokens")
    ids = prompt_ids(engine, text, params.max_new_tokens if asked is not None else None, "max_new_tokens")
    run = _Run(engine, mv, serving(request).metrics, started, adapter, request,
               "v2/generate_stream" if stream else "v2/generate")
    run.submit_all([ids], params, 1)
    return await respond(request, KServeGenerateAnswer(run, engine, model), stream)


@router.post("/v2/models/{model}/generate")
@router.post("/v2/models/{model}/versions/{version}/generate")
@access_logged("v2/generate")
async def generate(request: Request, model: str, version: Optional[str] = None):
    return await _kserve_generate(request, model, version, stream=False)


@router.post("/v2/models/{model}/generate_stream")
@router.post("/v2/models/{model}/versions/{version}/generate_stream")
@access_logged("v2/generate_stream")
async def generate_stream(request: Request, model: str, version: Optional[str] = None):
    return await _kserve_generate(request, model, version, stream=True)
