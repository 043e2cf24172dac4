"""A lean streaming load generator for OpenAI-compatible text generation: TTFT, TPOT, tokens/s under N streams.

    prompts = stdlib_prompts(tokenizer, n=64, prompt_tokens=128)
    bodies = completion_bodies("lm", prompts, max_tokens=128)
    result = run_stream_load("http://127.0.0.1:8080", bodies, concurrency=16, warmup_s=5, duration_s=20)

Closed loop: ``concurrency`` keep-alive connections, each streaming one ``POST /v1/completions``
(``stream: true``, ``stream_options.include_usage``) after another. A mix of models (e.g. a base model's LoRA
adapters, ``{"lm:a": bodies_a, "lm:b": bodies_b}``) spreads the streams round-robin over them: stream s sends
group ``s mod G``'s bodies, and the result has one summary per group (``by_group``) besides the total. Like :mod:`deepseek.bench.loadgen` it
writes pre-built request bytes on raw HTTP/1.1 and parses only what it needs (status, chunked framing,
``data:`` lines), so on a 2-core machine the client takes little from the server it measures.

What counts (the definitions of vLLM's ``benchmark_serving``):

- the requests *sent* inside the window ``[warm-up, warm-up + duration)``: each worker finishes the request it
  has in flight when the window ends, so none of them is cut short and long requests are not under-counted;
- TTFT: send to the first chunk with a choice; TPOT: (last token - first token) / (completion tokens - 1);
  ITL: the gaps between consecutive chunks of a request; E2E: send to the end of the stream;
- output tokens/s: completion tokens *arriving* inside the window, divided by its length (a request's tokens
  are its ``usage.completion_tokens`` spread over its chunks); requests/s: streams ending inside the window.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional, Sequence

import orjson

from deepseek.bench.loadgen import check_load, new_event_loop, percentile, sample_cpu

PATH = "/v1/completions"


@dataclass
class StreamRecord:
    """One streamed request, as the client saw it (``time.perf_counter`` seconds)."""

    sent: float
    chunk_times: list[float] = field(default_factory=list)  # chunks carrying a choice
    done: Optional[float] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Optional[str] = None
    group: str = ""  # the model mix's group this stream belongs to ("" without a mix)


@dataclass
class StreamLoadResult:
    """One closed-loop run: throughput and latency percentiles (ms) of the requests sent inside the window."""

    concurrency: int
    duration_s: float
    requests: int  # sent inside the window and completed
    request_throughput: float  # streams ending inside the window, per second
    output_tokens_per_s: float
    prompt_tokens_mean: float
    completion_tokens_mean: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    ttft_mean_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    e2e_p50_ms: float
    e2e_p99_ms: float
    errors: dict[str, int] = field(default_factory=dict)
    client_cpu_cores: float = 0.0
    server_cpu_cores: Optional[float] = None
    label: str = ""
    by_group: dict[str, StreamLoadResult] = field(default_factory=dict)  # a model mix: each group's own figures

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_dict(self) -> dict:
        return asdict(self)


# -- request bodies ----------------------------------------------------------------------------------------------

def stdlib_prompts(tokenizer, n: int, prompt_tokens: int, seed: int = 0) -> list[str]:
    """``n`` prompts cut from the running interpreter's standard library source, ``prompt_tokens`` tokens each
    by ``tokenizer`` (``None``: about 4 characters a token). Real code, so prompts are as varied as the corpus."""
    from deepseek.data.sources import python_stdlib_dir

    rng = random.Random(seed)
    files = sorted(p for p in python_stdlib_dir().glob("*.py") if p.stat().st_size > 8 * prompt_tokens)
    if not files:
        raise RuntimeError(f"no standard library sources found in {python_stdlib_dir()}")
    prompts = []
    while len(prompts) < n:
        text = rng.choice(files).read_text(encoding="utf-8", errors="replace")
        start = rng.randrange(0, max(1, len(text) - 8 * prompt_tokens))
        piece = text[start:start + 8 * prompt_tokens]
        if tokenizer is None:
            prompts.append(piece[:4 * prompt_tokens])
            continue
        ids = tokenizer.encode(piece, add_special_tokens=False).ids
        if len(ids) >= prompt_tokens:
            prompts.append(tokenizer.decode(ids[:prompt_tokens], skip_special_tokens=False))
    return prompts


def completion_bodies(model: str, prompts: Sequence[str], max_tokens: int, *, ignore_eos: bool = True,
                      temperature: float = 0.0) -> list[bytes]:
    """Streaming ``/v1/completions`` bodies: a fixed output length (``ignore_eos``) makes runs comparable."""
    bodies = []
    for prompt in prompts:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
                "stream": True, "stream_options": {"include_usage": True}}
        if ignore_eos:
            body["ignore_eos"] = True
        bodies.append(orjson.dumps(body))
    return bodies


def _request_bytes(host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
             "Accept: text/event-stream", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# -- one streamed exchange ------------------------------------------------------------------------------------

class StreamError(Exception):
    """The server answered, but not with a complete stream; ``kind`` keys the error count."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readuntil(b"\r\n")
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        raise StreamError("malformed status line")
    headers = {}
    while True:
        line = await reader.readuntil(b"\r\n")
        if line == b"\r\n":
            return int(parts[1]), headers
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()


async def _body_pieces(reader: asyncio.StreamReader, headers: dict[str, str]):
    """The body as it arrives: chunked framing undone, or ``Content-Length`` bytes."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                return
            piece = await reader.readexactly(size + 2)
            yield piece[:-2]
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        yield await reader.read()


async def stream_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes,
                      record: StreamRecord) -> bool:
    """Send ``request`` and follow its event stream into ``record``; returns whether the connection stays open."""
    writer.write(request)
    status, headers = await _read_head(reader)
    keep_open = headers.get("connection", "").lower() != "close"
    if status != 200:
        async for _ in _body_pieces(reader, headers):
            pass
        raise StreamError(str(status))
    buffer = b""
    finished = False
    async for piece in _body_pieces(reader, headers):
        now = time.perf_counter()
        buffer += piece
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            if not event.startswith(b"data: "):
                continue
            payload = event[6:]
            if payload == b"[DONE]":
                finished = True
                continue
            data = orjson.loads(payload)
            if "error" in data:
                raise StreamError("error event")
            if data.get("choices"):
                record.chunk_times.append(now)
            usage = data.get("usage")
            if usage:
                record.prompt_tokens = usage.get("prompt_tokens", 0)
                record.completion_tokens = usage.get("completion_tokens", 0)
    if not finished:
        raise StreamError("stream without [DONE]")
    record.done = time.perf_counter()
    return keep_open


# -- the load -------------------------------------------------------------------------------------------------

async def run_stream_load_async(url: str, bodies: Sequence[bytes] | Mapping[str, Sequence[bytes]], *,
                                concurrency: int, warmup_s: float = 5.0, duration_s: float = 20.0, path: str = PATH,
                                headers: Optional[dict] = None, server_pid: Optional[int] = None,
                                label: str = "") -> StreamLoadResult:
    """``bodies``: one list rotated by every stream, or ``{group: bodies}`` (a model mix, see the module docs)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    groups = dict(bodies) if isinstance(bodies, Mapping) else {"": bodies}
    if any(not group_bodies for group_bodies in groups.values()):
        raise ValueError("every group of a model mix needs request bodies")
    host, port = check_load(url, [b for group_bodies in groups.values() for b in group_bodies], warmup_s, duration_s)
    names = list(groups)
    if concurrency < len(names):
        raise ValueError(f"{concurrency} streams cannot spread over {len(names)} models: give at least one each")
    requests = {name: [_request_bytes(host, port, path, b, headers or {}) for b in group_bodies]
                for name, group_bodies in groups.items()}
    start = time.perf_counter() + warmup_s
    end = start + duration_s
    records: list[StreamRecord] = []
    errors: collections.Counter = collections.Counter()
    cpu: dict[str, float] = {}

    async def worker(index: int) -> None:
        conn = None
        group = names[index % len(names)]  # streams round-robin over the mix's groups
        mine = requests[group]
        i, step = index // len(names), len(range(index % len(names), concurrency, len(names)))
        while time.perf_counter() < end:
            record = StreamRecord(sent=time.perf_counter(), group=group)
            try:
                if conn is None:
                    conn = await asyncio.open_connection(host, port)
                record.sent = time.perf_counter()
                if not await stream_once(*conn, mine[i % len(mine)], record):
                    conn[1].close()
                    conn = None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, StreamError) as exc:
                if start <= record.sent < end:
                    errors[group, exc.kind if isinstance(exc, StreamError) else type(exc).__name__] += 1
                if conn is not None:
                    conn[1].close()
                    conn = None
                await asyncio.sleep(0.05)  # a refusing or dead server: do not spin
            else:
                records.append(record)  # warm-up requests too: their tokens may arrive inside the window
            i += step
        if conn is not None:
            conn[1].close()

    sampler = asyncio.get_running_loop().create_task(sample_cpu(cpu, start, end, server_pid))
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    await sampler
    summary = {"start": start, "end": end, "cpu": cpu, "server": server_pid is not None}
    total_errors: collections.Counter = collections.Counter()
    for (_, kind), count in errors.items():
        total_errors[kind] += count
    result = summarize(records, total_errors, concurrency=concurrency, **summary, label=label)
    if isinstance(bodies, Mapping):  # CPU figures are the whole run's
        for g, name in enumerate(names):
            streams = len(range(g, concurrency, len(names)))
            result.by_group[name] = summarize(
                [r for r in records if r.group == name], {k: c for (n, k), c in errors.items() if n == name},
                concurrency=streams, **summary, label=name)
    return result


def _tokens_inside(records: Sequence[StreamRecord], start: float, end: float) -> float:
    tokens = 0.0
    for r in records:
        if r.chunk_times:
            per_chunk = r.completion_tokens / len(r.chunk_times)
            tokens += per_chunk * sum(1 for t in r.chunk_times if start <= t < end)
    return tokens


def summarize(records: Sequence[StreamRecord], errors: dict, *, concurrency: int, start: float, end: float,
              cpu: dict, server: bool, label: str = "") -> StreamLoadResult:
    """The result of a run from every completed record (see the module docs for what each number means)."""
    duration = end - start
    arrived = _tokens_inside(records, start, end)
    finished = sum(1 for r in records if start <= r.done < end)
    records = [r for r in records if start <= r.sent < end]
    ms = 1e3
    ttft = sorted((r.chunk_times[0] - r.sent) * ms for r in records if r.chunk_times)
    tpot = sorted((r.chunk_times[-1] - r.chunk_times[0]) / (r.completion_tokens - 1) * ms
                  for r in records if r.chunk_times and r.completion_tokens > 1)
    itl = sorted((b - a) * ms for r in records for a, b in zip(r.chunk_times, r.chunk_times[1:]))
    e2e = sorted((r.done - r.sent) * ms for r in records)
    n = len(records)
    wall = cpu["wall1"] - cpu["wall0"]
    return StreamLoadResult(
        concurrency=concurrency, duration_s=duration, requests=n,
        request_throughput=finished / duration, output_tokens_per_s=arrived / duration,
        prompt_tokens_mean=sum(r.prompt_tokens for r in records) / n if n else math.nan,
        completion_tokens_mean=sum(r.completion_tokens for r in records) / n if n else math.nan,
        ttft_p50_ms=percentile(ttft, 50), ttft_p99_ms=percentile(ttft, 99),
        ttft_mean_ms=sum(ttft) / len(ttft) if ttft else math.nan,
        tpot_p50_ms=percentile(tpot, 50), tpot_p99_ms=percentile(tpot, 99),
        itl_p50_ms=percentile(itl, 50), itl_p99_ms=percentile(itl, 99),
        e2e_p50_ms=percentile(e2e, 50), e2e_p99_ms=percentile(e2e, 99),
        errors=dict(errors), client_cpu_cores=(cpu["client1"] - cpu["client0"]) / wall,
        server_cpu_cores=(cpu["server1"] - cpu["server0"]) / wall if server else None, label=label)


def run_stream_load(url: str, bodies: Sequence[bytes] | Mapping[str, Sequence[bytes]], **kwargs) -> StreamLoadResult:
    """:func:`run_stream_load_async` on an event loop of its own (uvloop when installed); blocks until done.

    The objects alive now (torch and the rest of this process: ~3 x 10^5) are frozen out of the collector for
    the run: otherwise each full collection, triggered by the per-event dicts, stalls every stream for
    ~130-600 ms on the 2-core host and shows up as the client's latency, not the server's.
    """
    loop = new_event_loop()
    gc.collect()
    gc.freeze()
    try:
        return loop.run_until_complete(run_stream_load_async(url, bodies, **kwargs))
    finally:
        gc.unfreeze()
        loop.close()


# -- rendering -------------------------------------------------------------------------------------------------

def format_stream_table(results: Sequence[StreamLoadResult], title: Optional[str] = None):
    """A :class:`rich.table.Table`: streams, req/s, output tok/s, TTFT / TPOT / ITL / E2E percentiles, CPU."""
    from rich.table import Table

    table = Table(title=title)
    labelled = any(r.label for r in results)
    if labelled:
        table.add_column("setting")
    columns = ("streams", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "ITL p99",
               "E2E p50", "errors", "client CPU", "server CPU")
    for name in columns:
        table.add_column(name, justify="left" if name == "errors" else "right")
    for r in results:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(r.errors.items())) or "0"
        server = "-" if r.server_cpu_cores is None else f"{r.server_cpu_cores:.2f}"
        row = [str(r.concurrency), f"{r.request_throughput:.2f}", f"{r.output_tokens_per_s:.0f}",
               f"{r.ttft_p50_ms:.1f}", f"{r.ttft_p99_ms:.1f}", f"{r.tpot_p50_ms:.2f}", f"{r.tpot_p99_ms:.2f}",
               f"{r.itl_p99_ms:.2f}", f"{r.e2e_p50_ms:.0f}", errors, f"{r.client_cpu_cores:.2f}", server]
        table.add_row(*([r.label] if labelled else []), *row)
    table.caption = "latencies in ms; TTFT: send to first token; TPOT: per output token after the first"
    return table


def scaling_summary(results: Sequence[StreamLoadResult]) -> dict:
    """Each load's output tokens/s and TTFT p99 as multiples of the single-stream run (when there is one)."""
    single = next((r for r in results if r.concurrency == 1), None)
    if single is None or not single.output_tokens_per_s:
        return {}
    return {r.concurrency: {"tokens_per_s_x": r.output_tokens_per_s / single.output_tokens_per_s,
                            "ttft_p99_x": r.ttft_p99_ms / single.ttft_p99_ms}
            for r in results if r.concurrency != 1}
