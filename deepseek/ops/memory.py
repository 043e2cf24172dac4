"""Memory a profiled run holds: the process's resident set (now and its high-water mark) and, on CUDA, the caching
allocator's allocated vs reserved bytes (their gap is fragmentation) with a snapshot file for pytorch.org/memory_viz.

The CUDA parts are guarded by ``torch.cuda.is_available()`` and untested here (no GPU).
"""

from __future__ import annotations

import contextlib
import resource
import sys
from pathlib import Path
from typing import Iterator, Optional

import psutil
import torch


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """The process's RSS high-water mark (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def cuda_memory(device: torch.device) -> dict:
    """Allocated vs reserved bytes (now and peak), the inactive split bytes and allocator retries/OOMs."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return {}
    stats = torch.cuda.memory_stats(device)
    allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    return {"cuda_allocated_bytes": allocated, "cuda_reserved_bytes": reserved,
            "cuda_peak_allocated_bytes": stats.get("allocated_bytes.all.peak", 0),
            "cuda_peak_reserved_bytes": stats.get("reserved_bytes.all.peak", 0),
            "cuda_inactive_split_bytes": stats.get("inactive_split_bytes.all.current", 0),
            "cuda_fragmentation": 1.0 - allocated / reserved if reserved else 0.0,
            "cuda_alloc_retries": stats.get("num_alloc_retries", 0), "cuda_ooms": stats.get("num_ooms", 0)}


@contextlib.contextmanager
def cuda_memory_history(device: torch.device, snapshot: Path) -> Iterator[dict]:
    """Record the CUDA allocator's history while the block runs, then dump it to ``snapshot`` (a pickle for
    pytorch.org/memory_viz); ``info["snapshot"]`` says where. Nothing on a CPU."""
    info: dict[str, Optional[str]] = {"snapshot": None}
    if device.type != "cuda" or not torch.cuda.is_available():
        yield info
        return
    torch.cuda.memory._record_memory_history(max_entries=100_000)
    try:
        yield info
        torch.cuda.memory._dump_snapshot(str(snapshot))
        info["snapshot"] = str(snapshot)
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
