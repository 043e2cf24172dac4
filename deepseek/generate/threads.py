"""OpenMP thread pools and decoding from a worker thread: why small ops got 3-4x slower, and the remedy.

Every thread that runs a parallel torch op gets its own OpenMP (libgomp) pool of ``torch.get_num_threads()``
threads, kept for the life of that thread. libgomp counts every pooled thread, idle or not; once there are
more than cores (the thread that loaded the model has a pool, the engine thread has another), its workers
stop spin-waiting between parallel regions and sleep instead, so every region pays a futex wake-up: a
[512, 256] @ [256, 16] product went from 31 us to 120 us on the 2-core host, a ``small`` decoding step at
batch 16 from 7.1 ms to 18 ms (docs/benchmarks.md). Releasing the idle pool of a thread that has finished its
torch work (``omp_pause_resource_all``, OpenMP 5.0) brings the count back down.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Optional

OMP_PAUSE_SOFT = 1


@functools.lru_cache(maxsize=1)
def _libgomp() -> Optional[ctypes.CDLL]:
    """The libgomp torch loaded (found in this process's memory map), or None (another OpenMP, none)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line and "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)  # already loaded: this only returns its handle
        except OSError:
            continue
        if hasattr(lib, "omp_pause_resource_all"):
            lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
            return lib
    return None


def release_openmp_pool() -> bool:
    """Let the calling thread's idle OpenMP workers exit (they are re-created if it runs parallel ops again).

    Call it from a thread that is done with torch for a while, e.g. after loading a model that another
    thread will run. Returns whether a pool was released (False without libgomp or inside a parallel region).
    """
    lib = _libgomp()
    return lib is not None and lib.omp_pause_resource_all(OMP_PAUSE_SOFT) == 0
