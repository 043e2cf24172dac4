"""Per-version inference statistics in the shape Triton returns them (the KServe statistics extension).

    stats = ModelStats()
    stats.record_request(ok=True, total_ns=..., trace=trace)     # once per request
    stats.record_batch(record)                                   # once per executed batch (the batcher's callback)
    stats.to_json("digits", 1)   # {"name", "version", "last_inference", "inference_count", "execution_count",
                                 #  "inference_stats": {...}, "batch_stats": [...]} as GET v2/models/{m}/stats shows

``inference_count`` counts rows (batch items) and ``execution_count`` model executions, so their ratio is
the average batch size, as in Triton. Durations are cumulative nanoseconds with a count. Everything is
updated from the event loop's thread only, so no lock is needed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

from deepseek.serve.batching import BatchRecord, RequestTrace


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += int(ns)

    def to_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class BatchSizeStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


INFERENCE_STATS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
                   "cache_hit", "cache_miss")


@dataclass
class ModelStats:
    """Cumulative statistics of one model version (see module docs)."""

    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    durations: dict[str, Duration] = field(default_factory=lambda: {k: Duration() for k in INFERENCE_STATS})
    batches: dict[int, BatchSizeStats] = field(default_factory=dict)

    def record_request(self, ok: bool, total_ns: int, trace: Optional[RequestTrace] = None, rows: int = 1) -> None:
        """One finished request: success (with its queue/compute split) or failure."""
        self.last_inference_ms = int(time.time() * 1000)
        if not ok:
            self.durations["fail"].add(total_ns)
            return
        self.durations["success"].add(total_ns)
        self.inference_count += rows
        if trace is not None:
            self.durations["queue"].add(trace.queue_ns)
            self.durations["compute_input"].add(trace.compute_input_ns)
            self.durations["compute_infer"].add(trace.compute_infer_ns)
            self.durations["compute_output"].add(trace.compute_output_ns)

    def record_batch(self, record: BatchRecord) -> None:
        """One model execution (successful or not) of ``record.size`` rows."""
        if not record.ok:
            return
        self.execution_count += 1
        per_size = self.batches.setdefault(record.size, BatchSizeStats())
        per_size.compute_input.add(record.compute_input_ns)
        per_size.compute_infer.add(record.compute_infer_ns)
        per_size.compute_output.add(record.compute_output_ns)

    def to_json(self, name: str, version: Optional[int]) -> dict[str, Any]:
        return {
            "name": name,
            "version": "" if version is None else str(version),
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {k: d.to_json() for k, d in self.durations.items()},
            "response_stats": {},
            "batch_stats": [{"batch_size": size, "compute_input": b.compute_input.to_json(),
                             "compute_infer": b.compute_infer.to_json(), "compute_output": b.compute_output.to_json()}
                            for size, b in sorted(self.batches.items())],
            "memory_usage": [],
        }
