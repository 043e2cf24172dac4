"""OpenAI-compatible text generation, and KServe v2's generate extension, on the server's HTTP app.

    GET  /v1/models                      the language models (``backend: deepseek``) with their versions
    POST /v1/completions                 prompt(s) -> text; ``stream: true`` gives server-sent events
    POST /v1/chat/completions            messages -> assistant message (chat template from the tokenizer)
    POST /v2/models/{m}[/versions/{v}]/generate          {"text_input", "parameters"} -> {"text_output"}
    POST /v2/models/{m}[/versions/{v}]/generate_stream   the same as server-sent events, one per token

``model`` is a model name (the routing policy picks the version, as for inference) or ``name/version``.
Requests run on the version's continuous batching engine (:mod:`deepseek.generate.continuous`); a client
that disconnects cancels its request, which frees its slot on the engine's next step. Errors use OpenAI's
shape ``{"error": {"message", "type", "param", "code"}}``: 400 malformed, 404 unknown model, 429 queue
full (with ``Retry-After``), 503 unavailable. Parameters beyond OpenAI's: ``top_k``,
``repetition_penalty``, ``ignore_eos``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Mapping, Optional

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from deepseek.config import ConfigError
from deepseek.data.tokenizer import ASSISTANT, END, SYSTEM, USER
from deepseek.generate.continuous import (ContinuousBatchingEngine, EngineStoppedError, GenerationEvent,
                                          QueueFullError)
from deepseek.generate.params import SamplingParams
from deepseek.serve.manager import ModelManager, ModelNotFoundError, ModelUnavailableError, ModelVersion

MAX_N = 16
_CHAT_ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
_COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop",
                  "presence_penalty", "frequency_penalty", "seed", "user", "logit_bias", "top_k",
                  "repetition_penalty", "ignore_eos"}
COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "logprobs", "echo", "best_of", "suffix"}
CHAT_FIELDS = _COMMON_FIELDS | {"messages", "logprobs", "top_logprobs", "max_completion_tokens", "response_format",
                                "tools", "tool_choice", "parallel_tool_calls"}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, type_: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.type = type_ or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                              413: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")

    def response(self) -> Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": None}}
        return Response(orjson.dumps(body), status_code=self.status, media_type="application/json",
                        headers=self.headers)


# -- request parsing ---------------------------------------------------------------------------------------

def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise OpenAIError(400, f"'{name}' must be a number in [{low}, {high}], got {value!r}", name)
    return float(value)


def _integer(body: dict, name: str, default: Optional[int], low: int, high: Optional[int] = None) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise OpenAIError(400, f"'{name}' must be {bound}, got {value!r}", name)
    return value


def _check_fields(body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise OpenAIError(400, f"Unrecognized request argument(s): {', '.join(unknown)}. "
                               f"Supported: {', '.join(sorted(allowed))}", unknown[0])
    if body.get("logit_bias"):
        raise OpenAIError(400, "'logit_bias' is not supported", "logit_bias")


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise OpenAIError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop")
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
            stop=_stop(body), ignore_eos=bool(body.get("ignore_eos", False)),
            seed=_integer(body, "seed", None, -(2 ** 63), 2 ** 63 - 1), logprobs=logprobs)
    except ConfigError as exc:
        raise OpenAIError(400, str(exc)) from None


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise OpenAIError(400, "'stream' must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or (options and not stream):
        raise OpenAIError(400, "'stream_options' is an object and is only allowed with stream: true", "stream_options")
    return stream, bool(options.get("include_usage", False))


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
    raise OpenAIError(400, "'prompt' must be a string, a list of strings, a list of token ids, or a list of "
                           "token-id lists (non-empty)", "prompt")


def _message_text(message: Any, i: int) -> tuple[str, str]:
    if not isinstance(message, dict) or message.get("role") not in _CHAT_ROLES:
        raise OpenAIError(400, f"messages[{i}] must be an object with role system, user or assistant",
                          f"messages[{i}]")
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text ones can be served by a text model
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise OpenAIError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise OpenAIError(400, f"messages[{i}].content must be a string or a list of text parts",
                          f"messages[{i}].content")
    return message["role"], content


def chat_prompt(tokenizer, messages: Any) -> tuple[str, list[int], list[str]]:
    """The prompt text for ``messages``, plus the stop token ids and stop strings that end the reply.

    Tokenizers trained by the framework have role tokens: ``<|user|>text<|end|>...<|assistant|>``, and the
    reply ends at ``<|end|>``. Others (the byte tokenizer) get a plain ``User: ...`` transcript.
    """
    if not isinstance(messages, list) or not messages:
        raise OpenAIError(400, "'messages' must be a non-empty list", "messages")
    turns = [_message_text(m, i) for i, m in enumerate(messages)]
    role_ids = [tokenizer.token_to_id(t) for t in (*_CHAT_ROLES.values(), END)]
    if all(i is not None for i in role_ids):
        text = "".join(f"{_CHAT_ROLES[role]}{content}{END}" for role, content in turns) + ASSISTANT
        return text, [role_ids[-1], role_ids[1]], []
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    text = "".join(f"{names[role]}: {content}\n" for role, content in turns) + "Assistant:"
    return text, [], ["\nUser:", "\nSystem:"]


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

    def __init__(self, engine: ContinuousBatchingEngine, mv: ModelVersion, metrics, started: float):
        self.engine, self.mv, self.metrics, self.started = engine, mv, metrics, started
        self.mailbox = _mailbox(asyncio.get_running_loop())
        self.queue: asyncio.Queue = asyncio.Queue()
        self.requests: list = []
        self.choices: list[_Choice] = []
        self.pending = 0

    def submit(self, prompt, params: SamplingParams, extra_stop_ids: list[int] = ()) -> None:
        if extra_stop_ids:
            params = dataclasses.replace(params, stop_token_ids=[*params.stop_token_ids, *extra_stop_ids])
        index = len(self.choices)
        choice = _Choice(index)
        self.choices.append(choice)

        def deliver(event: GenerationEvent) -> None:  # engine thread
            self.mailbox.post(self.queue, (choice, event))

        try:
            self.requests.append(self.engine.submit(prompt, params, on_event=deliver))
        except QueueFullError as exc:
            raise OpenAIError(429, f"server busy: {exc}", headers={"Retry-After": "1"}) from None
        except EngineStoppedError as exc:
            raise OpenAIError(503, str(exc)) from None
        except (ValueError, ConfigError) as exc:
            raise OpenAIError(400, f"{exc} (context: {self.engine.max_len} tokens)", "prompt") from None
        self.pending += 1

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
            if event.finish_reason is not None:
                choice.finish_reason = event.finish_reason
                self.pending -= 1
                self.metrics.observe_generation(name, version, event.finish_reason, event.prompt_tokens,
                                                choice.first_token_s, now - self.started)
            yield choice, event

    def usage(self) -> dict:
        prompt = sum(c.prompt_tokens for c in self.choices)
        completion = sum(c.completion_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _nth_choice(params: SamplingParams, j: int) -> SamplingParams:
    """Choice ``j`` of ``n``: a seeded request gives each choice its own seed (seed, seed + 1, ...)."""
    return params if params.seed is None or j == 0 else dataclasses.replace(params, seed=params.seed + j)


def _finish_reason(reason: Optional[str]) -> Optional[str]:
    # OpenAI knows stop and length; a cancelled or timed-out request ends as "length" was not reached either
    return None if reason is None else reason if reason in ("stop", "length") else "stop"


def _sse(data: Any) -> bytes:
    return b"data: " + (data if isinstance(data, bytes) else orjson.dumps(data)) + b"\n\n"


# -- the routes ----------------------------------------------------------------------------------------------

def register_openai(app: FastAPI, manager: ModelManager, *, read_body: Callable, check_inference_key: Callable,
                    routing_header: str) -> None:
    """Add the OpenAI and KServe-generate routes to ``app`` (``read_body`` enforces the size limit;
    ``check_inference_key(headers)`` raises when inference needs a key the request lacks)."""
    metrics = app.state.metrics

    async def parse(request: Request) -> dict:
        try:
            check_inference_key(request.headers)
            raw = await read_body(request)
        except Exception as exc:  # the KServe ProtocolError: keep its status, answer in OpenAI's shape
            status = getattr(exc, "status", None)
            if status is None:
                raise
            raise OpenAIError(status, getattr(exc, "message", str(exc)), headers=getattr(exc, "headers", None)) from None
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise OpenAIError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise OpenAIError(400, "request body must be a JSON object")
        return body

    def language_model(model: Any, request: Request) -> tuple[ModelVersion, ContinuousBatchingEngine]:
        if not isinstance(model, str) or not model:
            raise OpenAIError(400, "'model' is required: a model name, or name/version", "model")
        name, _, version_text = model.partition("/")
        version = None
        if version_text:
            if not version_text.isdigit() or int(version_text) < 1:
                raise OpenAIError(400, f"invalid model version in {model!r}", "model")
            version = int(version_text)
        try:
            mv, _ = manager.select(name, version, request.headers.get(routing_header))
        except ModelNotFoundError as exc:
            raise OpenAIError(404, str(exc), "model") from None
        except ModelUnavailableError as exc:
            raise OpenAIError(503, str(exc), "model") from None
        engine_of = getattr(mv.backend, "engine", None)
        if engine_of is None:
            raise OpenAIError(400, f"model {name!r} is not a language model (backend {mv.config.backend})", "model")
        try:
            return mv, engine_of()
        except Exception as exc:
            raise OpenAIError(503, f"model {name!r} cannot generate now: {exc}", "model") from None

    async def watch_disconnect(request: Request, run: _Run) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                run.cancel()
                return

    async def respond(request: Request, run: _Run, stream: bool, chunk: Callable, final: Callable,
                      include_usage: bool, created: int, rid: str, model: str, object_name: str) -> Response:
        if stream:
            async def body() -> AsyncIterator[bytes]:
                finished = False
                try:
                    async for choice, event in run.events():
                        for piece in chunk(choice, event):
                            yield _sse(piece)
                    if include_usage:
                        yield _sse({"id": rid, "object": object_name, "created": created, "model": model,
                                    "choices": [], "usage": run.usage()})
                    yield _sse(b"[DONE]")
                    finished = True
                finally:
                    if not finished:  # the client went away (or the server is stopping): free the slots
                        run.cancel()
            return StreamingResponse(body(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.get_running_loop().create_task(watch_disconnect(request, run))
        try:
            async for choice, event in run.events():
                choice.text.append(event.delta)
                if event.logprob is not None:
                    choice.logprobs.append((event.delta, event.logprob))
        finally:
            watcher.cancel()
            run.cancel()
        return Response(orjson.dumps(final()), media_type="application/json")

    def token_text(engine: ContinuousBatchingEngine, token_id: int) -> str:
        return engine.tokenizer.decode([token_id], skip_special_tokens=False)

    # -- /v1/models ------------------------------------------------------------------------------------

    @app.get("/v1/models")
    async def list_models(request: Request):
        try:
            check_inference_key(request.headers)
        except Exception as exc:
            raise OpenAIError(getattr(exc, "status", 401), getattr(exc, "message", str(exc))) from None
        models: dict[str, list[str]] = {}
        for name, version, mv in manager.snapshot():
            if mv.ready and hasattr(mv.backend, "engine"):
                models.setdefault(name, []).append(str(version))
        data = [{"id": name, "object": "model", "created": int(app.state.started_at), "owned_by": "deepseek",
                 "versions": sorted(versions, key=int)} for name, versions in sorted(models.items())]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request):
        mv, _ = language_model(model, request)
        return Response(orjson.dumps({"id": model, "object": "model", "created": int(app.state.started_at),
                                      "owned_by": "deepseek", "version": str(mv.version)}),
                        media_type="application/json")

    # -- /v1/completions -----------------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(request: Request):
        started = time.monotonic()
        body = await parse(request)
        _check_fields(body, COMPLETION_FIELDS)
        n = _integer(body, "n", 1, 1, MAX_N)
        if body.get("echo") or body.get("suffix") or body.get("best_of") not in (None, 1, n):
            raise OpenAIError(400, "'echo', 'suffix' and a 'best_of' other than n are not supported")
        prompts = _prompts(body)
        stream, include_usage = _stream_flags(body)
        params = sampling_params(body, _integer(body, "max_tokens", 16, 1), _integer(body, "logprobs", None, 0, 20))
        mv, engine = language_model(body.get("model"), request)
        run = _Run(engine, mv, metrics, started)
        try:
            for prompt in prompts:
                for j in range(n):
                    run.submit(prompt, _nth_choice(params, j))
        except OpenAIError:
            run.cancel()
            raise
        rid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), body["model"]
        base = {"id": rid, "object": "text_completion", "created": created, "model": model}

        def logprobs_block(entries: list) -> Optional[dict]:
            if params.logprobs is None:
                return None
            tokens, offsets, text_len = [], [], 0
            for delta, lp in entries:
                tokens.append(token_text(engine, lp.token_id))
                offsets.append(text_len)
                text_len += len(delta)
            return {"tokens": tokens, "token_logprobs": [lp.logprob for _, lp in entries],
                    "top_logprobs": [{token_text(engine, t): v for t, v in lp.top} for _, lp in entries],
                    "text_offset": offsets}

        def chunk(choice: _Choice, event: GenerationEvent):
            if not event.delta and event.finish_reason is None and event.logprob is None:
                return []
            lp = logprobs_block([(event.delta, event.logprob)]) if event.logprob is not None else None
            return [{**base, "choices": [{"index": choice.index, "text": event.delta, "logprobs": lp,
                                          "finish_reason": _finish_reason(event.finish_reason)}]}]

        def final() -> dict:
            return {**base, "choices": [{"index": c.index, "text": "".join(c.text),
                                         "logprobs": logprobs_block(c.logprobs),
                                         "finish_reason": _finish_reason(c.finish_reason)} for c in run.choices],
                    "usage": run.usage()}

        return await respond(request, run, stream, chunk, final, include_usage, created, rid, model, "text_completion")

    # -- /v1/chat/completions ------------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        started = time.monotonic()
        body = await parse(request)
        _check_fields(body, CHAT_FIELDS)
        if body.get("tools") or body.get("tool_choice") not in (None, "none"):
            raise OpenAIError(400, "tool calling is not supported", "tools")
        response_format = body.get("response_format")
        if response_format not in (None, {"type": "text"}):
            raise OpenAIError(400, "only response_format {'type': 'text'} is supported", "response_format")
        n = _integer(body, "n", 1, 1, MAX_N)
        stream, include_usage = _stream_flags(body)
        want_logprobs = body.get("logprobs") or False
        if not isinstance(want_logprobs, bool):
            raise OpenAIError(400, "'logprobs' must be a boolean for chat completions", "logprobs")
        top = _integer(body, "top_logprobs", 0, 0, 20)
        max_tokens = _integer(body, "max_completion_tokens", None, 1)
        max_tokens = max_tokens if max_tokens is not None else _integer(body, "max_tokens", None, 1)
        mv, engine = language_model(body.get("model"), request)
        text, stop_ids, stop_strings = chat_prompt(engine.tokenizer, body.get("messages"))
        params = sampling_params(body, max_tokens or engine.max_len, top if want_logprobs else None)
        if stop_strings:
            params = dataclasses.replace(params, stop=[*params.stop, *stop_strings])
        run = _Run(engine, mv, metrics, started)
        try:
            for j in range(n):
                run.submit(text, _nth_choice(params, j), stop_ids)
        except OpenAIError:
            run.cancel()
            raise
        rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body["model"]
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
        started_choices: set[int] = set()

        def logprob_entry(lp) -> dict:
            token = token_text(engine, lp.token_id)
            return {"token": token, "logprob": lp.logprob, "bytes": list(token.encode()),
                    "top_logprobs": [{"token": (t := token_text(engine, i)), "logprob": v, "bytes": list(t.encode())}
                                     for i, v in lp.top]}

        def chunk(choice: _Choice, event: GenerationEvent):
            pieces = []
            if choice.index not in started_choices:
                started_choices.add(choice.index)
                pieces.append({**base, "choices": [{"index": choice.index, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]})
            if event.delta or event.logprob is not None:
                lp = {"content": [logprob_entry(event.logprob)]} if event.logprob is not None else None
                pieces.append({**base, "choices": [{"index": choice.index, "delta": {"content": event.delta},
                                                    "logprobs": lp, "finish_reason": None}]})
            if event.finish_reason is not None:
                pieces.append({**base, "choices": [{"index": choice.index, "delta": {}, "logprobs": None,
                                                    "finish_reason": _finish_reason(event.finish_reason)}]})
            return pieces

        def final() -> dict:
            return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": c.index,
                                 "message": {"role": "assistant", "content": "".join(c.text)},
                                 "logprobs": {"content": [logprob_entry(lp) for _, lp in c.logprobs]}
                                 if want_logprobs else None,
                                 "finish_reason": _finish_reason(c.finish_reason)} for c in run.choices],
                    "usage": run.usage()}

        return await respond(request, run, stream, chunk, final, include_usage, created, rid, model,
                             "chat.completion.chunk")

    # -- KServe v2 generate extension ------------------------------------------------------------------------

    async def kserve_generate(request: Request, model: str, version: Optional[str], stream: bool):
        started = time.monotonic()
        body = await parse(request)
        text = body.get("text_input")
        if not isinstance(text, str):
            raise OpenAIError(400, "'text_input' (a string) is required", "text_input")
        options = body.get("parameters") or {}
        if not isinstance(options, dict):
            raise OpenAIError(400, "'parameters' must be an object", "parameters")
        mv, engine = language_model(model if version is None else f"{model}/{version}", request)
        try:
            params = SamplingParams.from_dict({"temperature": 0.0, **options})
        except (ConfigError, TypeError, ValueError) as exc:
            raise OpenAIError(400, f"parameters: {exc}", "parameters") from None
        run = _Run(engine, mv, metrics, started)
        run.submit(text, params)
        base = {"model_name": mv.name, "model_version": str(mv.version)}

        def chunk(choice: _Choice, event: GenerationEvent):
            if not event.delta and event.finish_reason is None:
                return []
            return [{**base, "text_output": event.delta, "finish_reason": event.finish_reason}]

        def final() -> dict:
            choice = run.choices[0]
            return {**base, "text_output": "".join(choice.text), "finish_reason": choice.finish_reason,
                    "usage": run.usage()}

        if stream:  # Triton's generate_stream: events, no [DONE] marker
            response = await respond(request, run, True, chunk, final, False, 0, "", model, "")
            response.body_iterator = _without_done(response.body_iterator)
            return response
        return await respond(request, run, False, chunk, final, False, 0, "", model, "")

    @app.post("/v2/models/{model}/generate")
    @app.post("/v2/models/{model}/versions/{version}/generate")
    async def generate(model: str, request: Request, version: Optional[str] = None):
        return await kserve_generate(request, model, version, stream=False)

    @app.post("/v2/models/{model}/generate_stream")
    @app.post("/v2/models/{model}/versions/{version}/generate_stream")
    async def generate_stream(model: str, request: Request, version: Optional[str] = None):
        return await kserve_generate(request, model, version, stream=True)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError):
        return exc.response()


async def _without_done(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async for piece in chunks:
        if piece != b"data: [DONE]\n\n":
            yield piece
