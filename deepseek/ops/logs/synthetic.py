"""Synthetic access logs with the server's field mix, and effects planted where a test or a demo wants them.

    write_synthetic_log("access.jsonl", 100_000, seed=0,
                        slow_queue=SlowQueue("digits", start=t0 + 600, end=t0 + 900, extra_ms=400),
                        bad_version=BadVersion("chat", version=2, latency_factor=1.6, error_rate=0.05))

Three models, as one server would log them: ``digits`` (KServe tensor model, ``v2/infer`` and ``grpc/infer``,
dynamic batches), ``chat`` (generation: OpenAI chat/completions, versions 1 and 2 as stable/canary, an adapter on
some requests, tokens in/out, TTFT) and ``minilm`` (``openai/embeddings``). Latencies are log-normal; 0.5 % of
requests fail (429/500/503, gRPC UNAVAILABLE).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import orjson

CHUNK = 50_000


@dataclass(frozen=True)
class SlowQueue:
    """Between ``start`` and ``end`` (epoch s), ``model``'s requests wait ``extra_ms`` more in the queue."""

    model: str
    start: float
    end: float
    extra_ms: float


@dataclass(frozen=True)
class BadVersion:
    """``model``'s ``version`` is ``latency_factor`` times slower and fails ``error_rate`` of its requests."""

    model: str
    version: int
    latency_factor: float
    error_rate: float


def synthetic_lines(n: int, seed: int = 0, start: float = 1_796_000_400.0, rate_per_s: float = 50.0,
                    slow_queue: Optional[SlowQueue] = None, bad_version: Optional[BadVersion] = None):
    """Yield ``n`` access-log lines (bytes, newline-terminated), ``rate_per_s`` on average, from ``start``."""
    rng = np.random.default_rng(seed)
    t = start
    for first in range(0, n, CHUNK):
        k = min(CHUNK, n - first)
        times = t + np.cumsum(rng.exponential(1.0 / rate_per_s, k))
        t = float(times[-1])
        model_pick = rng.random(k)
        version = np.where(rng.random(k) < 0.8, 1, 2)
        queue = rng.lognormal(np.log(2.0), 0.8, k)
        compute = rng.lognormal(np.log(8.0), 0.4, k)
        other = rng.lognormal(np.log(0.5), 0.5, k)
        batch = rng.integers(1, 9, k)
        tokens_in = rng.integers(4, 512, k)
        tokens_out = rng.integers(1, 128, k)
        fail = rng.random(k)
        ids = rng.integers(0, 1 << 40, k)
        for i in range(k):
            ti = float(times[i])
            p = model_pick[i]
            if p < 0.5:
                model = "digits"
                route = "grpc/infer" if p < 0.1 else "v2/infer"
                rec = {"time": round(ti, 6), "route": route, "model": model, "version": 1,
                       "status": "OK" if route == "grpc/infer" else 200,
                       "id": f"r{ids[i]:x}", "variant": None, "client": f"10.0.0.{ids[i] % 50}",
                       "queue_ms": float(queue[i]), "compute_ms": float(compute[i] * (0.6 + 0.1 * batch[i])),
                       "batch_size": int(batch[i])}
                if route == "grpc/infer":
                    rec["protocol"] = "grpc"
            elif p < 0.85:
                model, v = "chat", int(version[i])
                rec = {"time": round(ti, 6), "route": "openai/chat", "model": model, "version": v,
                       "adapter": "sql" if ids[i] % 5 == 0 else None, "variant": "canary" if v == 2 else "stable",
                       "status": 200, "id": f"c{ids[i]:x}", "client": f"user{ids[i] % 200}",
                       "queue_ms": None, "compute_ms": None, "batch_size": 1, "tokens_in": int(tokens_in[i]),
                       "tokens_out": int(tokens_out[i]), "ttft_ms": float(20 + queue[i] * 5 + tokens_in[i] * 0.1)}
                gen = rec["ttft_ms"] + float(tokens_out[i]) * 4.0
                rec["total_ms"] = gen
            else:
                model = "minilm"
                rec = {"time": round(ti, 6), "route": "openai/embeddings", "model": model, "version": 1,
                       "status": 200, "id": f"e{ids[i]:x}", "client": f"user{ids[i] % 200}", "batch_size": 4,
                       "tokens_in": int(tokens_in[i]), "queue_ms": float(queue[i]) * 0.5,
                       "compute_ms": float(compute[i]) * 0.5}
            if "total_ms" not in rec:
                q = rec["queue_ms"]
                if slow_queue is not None and model == slow_queue.model and slow_queue.start <= ti < slow_queue.end:
                    q += slow_queue.extra_ms
                    rec["queue_ms"] = q
                rec["total_ms"] = q + rec["compute_ms"] + float(other[i])
            error_rate = 0.005
            if bad_version is not None and model == bad_version.model and rec["version"] == bad_version.version:
                rec["total_ms"] *= bad_version.latency_factor
                error_rate = bad_version.error_rate
            if fail[i] < error_rate:
                rec["status"] = "UNAVAILABLE" if rec.get("protocol") == "grpc" else (500, 503, 429)[ids[i] % 3]
            for key in ("queue_ms", "compute_ms", "total_ms", "ttft_ms"):
                if rec.get(key) is not None:
                    rec[key] = round(rec[key], 3)
            yield orjson.dumps(rec) + b"\n"


def write_synthetic_log(path: str | Path, n: int, seed: int = 0, **kwargs) -> Path:
    """Write :func:`synthetic_lines` to ``path`` (a scratch file: not atomic)."""
    path = Path(path)
    with open(path, "wb") as f:
        buffer = []
        for line in synthetic_lines(n, seed, **kwargs):
            buffer.append(line)
            if len(buffer) >= 10_000:
                f.write(b"".join(buffer))
                buffer.clear()
        f.write(b"".join(buffer))
    return path
