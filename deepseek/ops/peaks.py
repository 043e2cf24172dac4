"""The ceilings a profile is read against, measured on this device (cached per process): matmul FLOP/s per
precision and memory bandwidth, with the machine facts that make the numbers comparable.

On a CPU they come from :mod:`deepseek.hardware` (2048² products, a STREAM-style add). On CUDA the same two
measurements run on the GPU (synchronised); that path is written but untested (no GPU here).
"""

from __future__ import annotations

import functools
import platform
import time

import torch

from deepseek.hardware import cpu_name_and_flags, matmul_peak_flops, memory_bandwidth

PRECISIONS = ("fp32", "bf16")


def machine_facts(device: torch.device) -> dict:
    """CPU model, flags, torch capability and threads (and the GPU's name and capability on CUDA)."""
    name, flags = cpu_name_and_flags()
    facts = {"cpu_model": name, "machine": platform.machine(), "cpu_flags": sorted(flags),
             "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
             "torch": torch.__version__, "device": device.type}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        facts.update(gpu=torch.cuda.get_device_name(device), capability=f"sm_{major}{minor}")
    return facts


@functools.lru_cache(maxsize=None)
def _cuda_peaks(index: int, seconds: float) -> dict:  # untested: no GPU here
    device = torch.device("cuda", index)

    def rate(fn, work: float) -> float:
        fn()
        torch.cuda.synchronize(device)
        count, start = 0, time.perf_counter()
        while count == 0 or time.perf_counter() - start < seconds:
            fn()
            count += 1
        torch.cuda.synchronize(device)
        return work * count / (time.perf_counter() - start)

    n = 8192
    flops = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        flops[precision] = rate(lambda: a @ b, 2.0 * n ** 3)
    x, y = torch.ones(1 << 28, device=device), torch.empty(1 << 28, device=device)
    return {"matmul_flops": flops, "memory_bandwidth_bytes_per_s": rate(lambda: y.copy_(x), 2.0 * 4 * (1 << 28))}


def measured_peaks(device: torch.device, seconds: float = 0.6) -> dict:
    """``{"matmul_flops": {"fp32": …, "bf16": …}, "memory_bandwidth_bytes_per_s": …}`` of ``device``, measured
    once per process and thread count."""
    if device.type == "cuda":
        return _cuda_peaks(device.index if device.index is not None else torch.cuda.current_device(), seconds)
    threads = torch.get_num_threads()
    return {"matmul_flops": {p: matmul_peak_flops(p, threads, seconds=seconds) for p in PRECISIONS},
            "memory_bandwidth_bytes_per_s": memory_bandwidth(threads, seconds=seconds)}
