"""A lean HTTP load generator: closed- and open-loop load on one server, with latency percentiles and CPU.

    bodies = build_kserve_bodies(metadata, n=256, seed=0)
    result = run_load("http://127.0.0.1:8080", "/v2/models/m/infer", bodies, concurrency=16,
                      warmup_s=3, duration_s=20, server_pid=pid)
    Console().print(format_table([result]))

On a 2-core machine the client shares the cores with the server, so it must cost as little as possible:
an httpx client spends about 1.3 ms of CPU per request and becomes the bottleneck near 760 req/s, while
this one writes pre-built request bytes on raw keep-alive HTTP/1.1 connections (an :class:`asyncio.Protocol`
on uvloop when installed) and parses only the status line, ``Content-Length`` or ``Transfer-Encoding: chunked``
and ``Connection: close`` (about 0.05 core at 1,000 req/s).

Closed loop: ``concurrency`` connections, each sending its next request when the previous answer arrived.
Open loop: Poisson arrivals at ``rate`` req/s (seeded exponential gaps); an arrival takes an idle connection
or opens a new one, up to ``max_connections`` (more is counted as the error ``client_overload``), so a server
that falls behind is charged for the queueing it causes. Latency runs from the moment the request is sent; how
late the client sent it after its scheduled arrival (timer granularity, a busy client) is ``send_lag_ms``.

Only requests completing inside the measurement window (after ``warmup_s``) count. An answer whose status is
not ``expect_status``, or whose body lacks ``marker``, is an error keyed by its status (``"404"``, or
``"200 without marker"``); a transport failure is keyed by the exception name. Server CPU is the CPU time
(``utime + stime`` from ``/proc``) of the server's process, its descendants and, when it leads a process group,
every member of that group, over the window, divided by the window's wall time.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import math
import os
import random
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import urlsplit

DEFAULT_MAX_CONNECTIONS = 1024
_NO_BODY_STATUSES = frozenset({204, 304})


# -- one keep-alive connection ---------------------------------------------------------------------------

class _Connection(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection with at most one request in flight (no pipelining)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: Optional[asyncio.Transport] = None
        self.buffer = bytearray()
        self.waiter: Optional[asyncio.Future] = None
        self.closed = False
        self._head: Optional[tuple[int, Optional[int], bool, bool]] = None  # status, length, chunked, close

    # asyncio.Protocol callbacks
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is not None and not self.waiter.done():
            try:
                self._parse()
            except (ValueError, IndexError) as exc:  # a malformed header or chunk size
                self.waiter.set_exception(ConnectionError(f"malformed response: {exc}"))
                self.close()

    def eof_received(self):
        return False  # close our side too

    def connection_lost(self, exc) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            head = self._head
            if head is not None and head[1] is None and not head[2]:  # a body delimited by the connection's end
                waiter.set_result((head[0], bytes(self.buffer)))
            else:
                waiter.set_exception(exc or ConnectionResetError("the server closed the connection"))

    # the request
    async def request(self, data: bytes) -> tuple[int, bytes]:
        """Send one pre-encoded request and wait for its ``(status, body)``."""
        if self.closed:
            raise ConnectionResetError("the connection is closed")
        self.waiter = self.loop.create_future()
        self._head = None
        self.transport.write(data)
        return await self.waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _parse(self) -> None:
        buf = self.buffer
        if self._head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(buf[:end]).split(b"\r\n")
            del buf[:end + 4]
            status = int(lines[0].split(b" ", 2)[1])
            length, chunked, close = None, False, False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                elif name == b"connection":
                    close = b"close" in value.lower()
            if status in _NO_BODY_STATUSES or 100 <= status < 200:
                length = 0
            self._head = (status, length, chunked, close)
        status, length, chunked, close = self._head
        if chunked:
            parsed = _parse_chunked(buf)
            if parsed is None:
                return
            body, used = parsed
            del buf[:used]
        elif length is not None:
            if len(buf) < length:
                return
            body = bytes(buf[:length])
            del buf[:length]
        else:
            return  # read until the server closes (connection_lost answers)
        self.waiter.set_result((status, body))
        if close:
            self.close()


def _parse_chunked(buf: bytearray) -> Optional[tuple[bytes, int]]:
    """``(body, bytes used)`` of a complete chunked body at the start of ``buf``, or None while incomplete."""
    pos, parts = 0, []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n\r\n", pos - 2)  # no trailers: the CRLF right here; else after the trailers
            if end < 0:
                return None
            return b"".join(parts), end + 4
        if len(buf) < pos + size + 2:
            return None
        parts.append(bytes(buf[pos:pos + size]))
        pos += size + 2


async def _connect(host: str, port: int) -> _Connection:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: _Connection(loop), host, port)
    return conn


# -- results ---------------------------------------------------------------------------------------------

@dataclass
class LoadResult:
    """One load run: what was offered, what completed inside the window, latencies (ms), errors, CPU (cores)."""

    mode: str  # "closed" or "open"
    concurrency: Optional[int]  # closed loop: connections
    rate: Optional[float]  # open loop: offered req/s
    duration_s: float
    completed: int
    throughput: float  # req/s completed inside the window
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    errors: dict[str, int] = field(default_factory=dict)
    min_ms: float = math.nan
    client_cpu_cores: float = 0.0
    server_cpu_cores: Optional[float] = None
    send_lag_ms: Optional[float] = None  # open loop: mean delay of a send after its scheduled arrival
    label: str = ""

    @property
    def load(self) -> str:
        return f"c={self.concurrency}" if self.mode == "closed" else f"{self.rate:g}/s"

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of already sorted values, linearly interpolated; NaN when empty."""
    if not sorted_values:
        return math.nan
    k = (len(sorted_values) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


class _Window:
    """The measurement window's bookkeeping: latencies and errors of what completes inside it."""

    def __init__(self, start: float, end: float, expect_status: int, marker: Optional[bytes]):
        self.start, self.end = start, end
        self.expect_status, self.marker = expect_status, marker
        self.latencies: list[float] = []
        self.errors: collections.Counter = collections.Counter()

    def record(self, sent: float, done: float, status: int, body: bytes) -> None:
        if not self.start <= done < self.end:
            return
        if status != self.expect_status:
            self.errors[str(status)] += 1
        elif self.marker is not None and self.marker not in body:
            self.errors[f"{status} without marker"] += 1
        else:
            self.latencies.append(done - sent)

    def error(self, kind: str, when: float) -> None:
        if self.start <= when < self.end:
            self.errors[kind] += 1


# -- CPU time of the server, from /proc ----------------------------------------------------------------------

def _proc_table() -> dict[int, tuple[int, int, int, str]]:
    """``{pid: (ppid, pgrp, utime + stime in ticks, state)}`` of every process visible in /proc."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        fields = stat.rpartition(b")")[2].split()  # after "pid (comm)": state ppid pgrp ... utime(12) stime(13)
        table[int(entry.name)] = (int(fields[1]), int(fields[2]), int(fields[11]) + int(fields[12]),
                                  fields[0].decode())
    return table


def process_tree(pid: int, table: Optional[dict] = None) -> set[int]:
    """``pid``, its descendants and, when ``pid`` leads a process group, every member of that group."""
    table = _proc_table() if table is None else table
    members = {pid} if pid in table else set()
    if pid in table and table[pid][1] == pid:
        members |= {p for p, row in table.items() if row[1] == pid}
    children = collections.defaultdict(list)
    for p, row in table.items():
        children[row[0]].append(p)
    stack = list(members)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in members:
                members.add(child)
                stack.append(child)
    return members


def server_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of :func:`process_tree` of ``pid``."""
    table = _proc_table()
    ticks = sum(table[p][2] for p in process_tree(pid, table))
    return ticks / os.sysconf("SC_CLK_TCK")


# -- the load ------------------------------------------------------------------------------------------------

def _request_bytes(method: str, host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def check_load(url: str, bodies: Sequence[bytes], warmup_s: float, duration_s: float) -> tuple[str, int]:
    """``(host, port)`` of ``url`` once the load's arguments are checked (ValueError naming the bad one)."""
    if duration_s <= 0 or warmup_s < 0:
        raise ValueError(f"duration must be > 0 and warm-up >= 0, got {duration_s} and {warmup_s}")
    if not bodies:
        raise ValueError("no request bodies")
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"url must look like http://HOST:PORT, got {url!r}")
    return parts.hostname, parts.port or 80


async def sample_cpu(cpu: dict[str, float], start: float, end: float, server_pid: Optional[int]) -> None:
    """Fill ``cpu`` with the client's and the server's CPU seconds and the wall clock at ``start`` and ``end``
    (``client0``/``server0``/``wall0``, ``client1``/...; perf_counter times)."""
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    cpu["client0"], cpu["wall0"] = time.process_time(), time.perf_counter()
    if server_pid is not None:
        cpu["server0"] = server_cpu_seconds(server_pid)
    await asyncio.sleep(max(0.0, end - time.perf_counter()))
    cpu["client1"], cpu["wall1"] = time.process_time(), time.perf_counter()
    if server_pid is not None:
        cpu["server1"] = server_cpu_seconds(server_pid)


async def run_load_async(url: str, path: str, bodies: Sequence[bytes], *, concurrency: Optional[int] = None,
                         rate: Optional[float] = None, warmup_s: float = 3.0, duration_s: float = 20.0,
                         headers: Optional[dict[str, str]] = None, server_pid: Optional[int] = None,
                         expect_status: int = 200, marker: Optional[bytes] = None, method: str = "POST",
                         seed: int = 0, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                         label: str = "") -> LoadResult:
    """The load (see module docs) on the running event loop; exactly one of ``concurrency`` and ``rate``."""
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency (closed loop) and rate (open loop)")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    host, port = check_load(url, bodies, warmup_s, duration_s)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    requests = [_request_bytes(method, host, port, path, b, hdrs) for b in bodies]
    next_request = itertools.cycle(requests).__next__

    loop = asyncio.get_running_loop()
    now = time.perf_counter()
    window = _Window(now + warmup_s, now + warmup_s + duration_s, expect_status, marker)
    connections: set[_Connection] = set()
    cpu: dict[str, float] = {}

    async def open_connection() -> _Connection:
        conn = await _connect(host, port)
        connections.add(conn)
        return conn

    async def exchange(conn: Optional[_Connection], sent: float) -> tuple[Optional[_Connection], bool]:
        """One request on ``conn`` (a new connection when None or closed): the connection to reuse (None when
        the server closed it) and whether an answer came back."""
        try:
            if conn is None or conn.closed:
                if conn is not None:
                    connections.discard(conn)
                conn = await open_connection()
            status, body = await conn.request(next_request())
        except (OSError, ConnectionError, ValueError) as exc:
            window.error(type(exc).__name__, time.perf_counter())
            if conn is not None:
                conn.close()
                connections.discard(conn)
            return None, False
        window.record(sent, time.perf_counter(), status, body)
        return (None if conn.closed else conn), True

    async def closed_worker() -> None:
        conn = None
        while time.perf_counter() < window.end:
            conn, answered = await exchange(conn, time.perf_counter())
            if not answered:
                await asyncio.sleep(0.01)  # the server is down or refusing: do not spin

    idle: list[_Connection] = []
    busy = [0]
    lags: list[float] = []
    tasks: set[asyncio.Task] = set()

    async def open_request(conn: Optional[_Connection], sent: float) -> None:
        conn, _ = await exchange(conn, sent)
        busy[0] -= 1
        if conn is not None:
            idle.append(conn)

    async def open_loop() -> None:
        rng = random.Random(seed)
        arrival = time.perf_counter()
        while True:
            arrival += rng.expovariate(rate)
            if arrival >= window.end:
                return
            delay = arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            conn = None
            while idle and conn is None:
                conn = idle.pop()
                if conn.closed:
                    connections.discard(conn)
                    conn = None
            if conn is None and busy[0] + len(idle) >= max_connections:
                window.error("client_overload", arrival)
                continue
            now = time.perf_counter()
            if window.start <= arrival < window.end:
                lags.append(now - arrival)
            busy[0] += 1
            task = loop.create_task(open_request(conn, now))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    sampler = loop.create_task(sample_cpu(cpu, window.start, window.end, server_pid))
    if concurrency is not None:
        workers = [loop.create_task(closed_worker()) for _ in range(concurrency)]
        # Each worker stops after its request in flight at the window's end; that one no longer counts.
        done, pending = await asyncio.wait(workers, timeout=window.end - time.perf_counter() + 5.0)
    else:
        await open_loop()
        pending = set(tasks)
    await sampler
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    for conn in connections:
        conn.close()
    await asyncio.sleep(0)  # let the transports close

    wall = cpu["wall1"] - cpu["wall0"]
    latencies = sorted(x * 1e3 for x in window.latencies)
    server_cores = (cpu["server1"] - cpu["server0"]) / wall if server_pid is not None else None
    return LoadResult(
        mode="closed" if concurrency is not None else "open", concurrency=concurrency, rate=rate,
        duration_s=duration_s, completed=len(latencies), throughput=len(latencies) / duration_s,
        p50_ms=percentile(latencies, 50), p95_ms=percentile(latencies, 95), p99_ms=percentile(latencies, 99),
        mean_ms=sum(latencies) / len(latencies) if latencies else math.nan,
        max_ms=latencies[-1] if latencies else math.nan, min_ms=latencies[0] if latencies else math.nan,
        errors=dict(window.errors),
        client_cpu_cores=(cpu["client1"] - cpu["client0"]) / wall, server_cpu_cores=server_cores,
        send_lag_ms=sum(lags) / len(lags) * 1e3 if lags else None, label=label)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop event loop when uvloop is installed (cheaper per request), else asyncio's default."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_load(url: str, path: str, bodies: Sequence[bytes], **kwargs) -> LoadResult:
    """:func:`run_load_async` on an event loop of its own (uvloop when installed); blocks until done."""
    loop = new_event_loop()
    try:
        return loop.run_until_complete(run_load_async(url, path, bodies, **kwargs))
    finally:
        loop.close()


# -- request bodies --------------------------------------------------------------------------------------------

def _random_data(datatype: str, numel: int, rng: random.Random, int_high: int) -> list:
    if datatype in ("FP16", "FP32", "FP64", "BF16"):
        return [round(rng.uniform(-1.0, 1.0), 4) for _ in range(numel)]
    if datatype == "BOOL":
        return [rng.random() < 0.5 for _ in range(numel)]
    if datatype.startswith(("INT", "UINT")):
        return [rng.randrange(int_high) for _ in range(numel)]
    raise ValueError(f"cannot make random data for datatype {datatype}")


def fill_shape(shape: Sequence[int], dynamic: Sequence[int] = ()) -> list[int]:
    """A concrete request shape for a metadata ``shape`` whose -1 dims are the batch (leading) or dynamic.

    ``dynamic`` gives the sizes of the -1 dims in order: all of them, or all but a leading -1, which is then
    the batch dimension and gets 1. Dims left without a size get 1: ``fill_shape([-1, -1], [64]) == [1, 64]``.
    """
    free = [i for i, d in enumerate(shape) if d == -1]
    if len(dynamic) > len(free):
        raise ValueError(f"{len(dynamic)} sizes given for the {len(free)} dynamic dims of shape {list(shape)}")
    if free and free[0] == 0 and len(dynamic) < len(free):
        free = free[1:]  # the leading -1 is the batch dimension: one row per request
    out = [1 if d == -1 else d for d in shape]
    for i, size in zip(free, dynamic):
        out[i] = int(size)
    return out


def build_kserve_bodies(metadata: dict, n: int, seed: int = 0, shapes: Optional[dict[str, Sequence[int]]] = None,
                        int_high: int = 100) -> list[bytes]:
    """``n`` KServe v2 JSON infer bodies with random data for every input of the model ``metadata``.

    ``metadata`` is the answer of ``GET /v2/models/{m}``; each input's -1 dims are sized by ``shapes[name]``
    (see :func:`fill_shape`; a batch dimension gets 1). Integers are drawn in ``0..int_high - 1`` (token ids
    of a vocabulary), floats in -1..1.
    """
    rng = random.Random(seed)
    shapes = shapes or {}
    unknown = set(shapes) - {spec["name"] for spec in metadata["inputs"]}
    if unknown:
        raise ValueError(f"--shape names unknown input(s) {', '.join(sorted(unknown))}; the model has "
                         f"{', '.join(spec['name'] for spec in metadata['inputs'])}")
    resolved = [(spec, fill_shape(spec["shape"], shapes.get(spec["name"], ()))) for spec in metadata["inputs"]]
    bodies = []
    for _ in range(n):
        inputs = [{"name": spec["name"], "shape": shape, "datatype": spec["datatype"],
                   "data": _random_data(spec["datatype"], math.prod(shape), rng, int_high)}
                  for spec, shape in resolved]
        bodies.append(json.dumps({"inputs": inputs}, separators=(",", ":")).encode())
    return bodies


# -- servers under test ----------------------------------------------------------------------------------------

def start_server(command: Sequence[str], ready_url: str, *, timeout_s: float = 120.0,
                 log_path: Optional[Path] = None, env: Optional[dict] = None) -> subprocess.Popen:
    """Start a server in a session of its own and wait until ``GET ready_url`` answers 200.

    Its output goes to ``log_path`` (or nowhere); RuntimeError with the log's tail when it exits or times out.
    """
    import http.client

    log = open(log_path, "wb") if log_path is not None else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    finally:
        if log_path is not None:
            log.close()
    parts = urlsplit(ready_url)
    deadline = time.monotonic() + timeout_s
    while True:  # poll readiness: the server loads its models before it answers
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}{_log_tail(log_path)}")
        try:
            conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=2)
            conn.request("GET", parts.path or "/")
            ok = conn.getresponse().status == 200
            conn.close()
            if ok:
                return proc
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_server(proc, grace_s=5)
            raise RuntimeError(f"the server was not ready within {timeout_s:g} s{_log_tail(log_path)}")
        time.sleep(0.1)


def _log_tail(log_path: Optional[Path]) -> str:
    if log_path is None:
        return ""
    try:
        lines = Path(log_path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return (": " + " | ".join(lines[-5:])) if lines else ""


def stop_server(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the server, wait ``grace_s``, then end every process left in its process group, by pid.

    Servers that fork workers (LitServe leaves its Manager, workers and uvicorn process running when the main
    process dies) are reaped too: SIGTERM to each survivor, then SIGKILL to those that ignore it.
    """
    pgid = proc.pid  # start_server made it a session (and process group) leader
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        survivors = _group_members(pgid)
        if not survivors:
            break
        for pid in survivors:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while _group_members(pgid) and time.monotonic() < deadline:
            if proc.poll() is None:
                try:
                    proc.wait(timeout=0.05)
                except subprocess.TimeoutExpired:
                    pass
            time.sleep(0.05)
    if proc.poll() is None:
        proc.wait(timeout=5)


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    return [pid for pid, (_, pgrp, _, state) in _proc_table().items() if pgrp == pgid and state != "Z"]


# -- rendering -------------------------------------------------------------------------------------------------

def format_table(results: Sequence[LoadResult], title: Optional[str] = None):
    """A :class:`rich.table.Table` of the results: load, req/s, latency percentiles, errors, CPU."""
    from rich.table import Table

    table = Table(title=title)
    labelled = any(r.label for r in results)
    if labelled:
        table.add_column("setting")
    for name in ("load", "req/s", "p50 ms", "p95 ms", "p99 ms", "mean ms", "errors", "client CPU", "server CPU"):
        table.add_column(name, justify="left" if name in ("load", "errors") else "right")
    for r in results:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(r.errors.items())) or "0"
        server = "-" if r.server_cpu_cores is None else f"{r.server_cpu_cores:.2f}"
        row = [r.load, f"{r.throughput:.1f}", f"{r.p50_ms:.2f}", f"{r.p95_ms:.2f}", f"{r.p99_ms:.2f}",
               f"{r.mean_ms:.2f}", errors, f"{r.client_cpu_cores:.2f}", server]
        table.add_row(*([r.label] if labelled else []), *row)
    return table
