"""What this device does fast, measured once per process: the ground every precision and kernel choice stands on.

The same machine type can come as an AVX-512 CPU with native bf16 (bf16 products 2-4x faster than fp32) or as an
AVX2-only CPU (bf16 products ~60-100x *slower*, int8 ``_int_mm`` ~38x slower). Nothing here assumes: a profile
holds what the CPU says it has (flags from ``/proc/cpuinfo`` or ``sysctl``, torch's capability string) and what
a micro-probe measured (fp32 vs bf16 vs int8 products of one small shape, tens of milliseconds, cached per
process and thread count). The decisions (:func:`choose_precision`, :func:`int8_products_fast`,
:func:`bf16_products_fast`) are pure functions of a profile, so tests inject the profile of any CPU.

    from deepseek.hardware import hardware_profile, choose_precision
    profile = hardware_profile()               # flags + probe of this process's CPU (cached)
    choice = choose_precision("auto", profile)  # PrecisionChoice(precision="fp32", reason="...")
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

# x86 and Arm feature flags that decide which products are fast (names as Linux's /proc/cpuinfo spells them).
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")          # bf16 dot products (x86 AVX-512/AMX, Arm FEAT_BF16)
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "i8mm", "asimddp")  # int8 dot products without 16-bit saturation
NOTABLE_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16",
                 "amx_int8", "amx_tile", "asimd", "asimddp", "bf16", "i8mm", "sve", "sve2")
PROBE_SHAPE = (64, 256, 512)   # rows x inner x outputs: a token block through a small model's projection
DECODE_SHAPE = (1, 256, 1024)  # one token's row: decoding is a matrix-vector product, where bf16 rarely pays
INT8_EXACT_PROBE_SHAPE = (8, 64, 32)  # the int8 exactness check: small, but past the kernels' blocking sizes
BF16_MIN_SPEEDUP = 1.2         # bf16 must beat fp32 by this much to be chosen: autocast adds casts around it
INT8_MIN_SPEEDUP = 1.0         # _int_mm must at least match fp32 (its quantize/rescale ops are extra work)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
WORKLOADS = ("train", "decode")  # token blocks (training, evaluation, prefill) or one token per sequence (generation)


@dataclass(frozen=True)
class HardwareProfile:
    """One device: what it says it has and, where probed, what its products reached (GFLOP/s, int8 in GOP/s)."""

    device_type: str                    # "cpu" or "cuda"
    name: str                           # CPU model name or GPU name
    machine: str = ""                   # x86_64, aarch64, arm64
    capability: str = ""                # torch's CPU capability (AVX2, AVX512, ...) or CUDA "sm_90"
    flags: frozenset[str] = frozenset()  # the NOTABLE_FLAGS present
    threads: int = 1                    # intra-op threads torch uses
    # GFLOP/s: {"fp32", "bf16", "int8"} at PROBE_SHAPE, {"fp32_decode", "bf16_decode"} at DECODE_SHAPE
    measured: dict[str, float] = field(default_factory=dict)
    probe_shape: tuple[int, int, int] = PROBE_SHAPE
    cuda_bf16: bool = False             # CUDA only: torch.cuda.is_bf16_supported()
    # CPU, where probed: torch._int_mm returned exact int32 sums for operands whose 16-bit pair sums saturate
    # (False: oneDNN's AVX2 u8s8 path, vpmaddubsw, without VNNI); None: not probed, the flags decide.
    int8_exact: Optional[bool] = None

    @property
    def native_bf16(self) -> bool:
        """The hardware has bf16 dot-product instructions (flags), or is a CUDA GPU that supports bf16."""
        if self.device_type == "cuda":
            return self.cuda_bf16
        return any(f in self.flags for f in BF16_FLAGS)

    @property
    def native_int8(self) -> bool:
        """int8 dot products that accumulate in 32 bits (VNNI, AMX, Arm dot-product/I8MM), or CUDA."""
        return self.device_type == "cuda" or any(f in self.flags for f in INT8_FLAGS)

    def speedup(self, kind: str, baseline: str = "fp32") -> Optional[float]:
        """Measured throughput of ``kind`` products ÷ ``baseline``'s (None when either was not measured)."""
        if kind in self.measured and self.measured.get(baseline):
            return self.measured[kind] / self.measured[baseline]
        return None

    def summary(self) -> str:
        """One line for logs and benchmark headers."""
        flags = ",".join(sorted(self.flags)) or "-"
        speeds = " ".join(f"{k}={v:.1f}" for k, v in self.measured.items())
        exact = {None: "", True: "; int8 products exact", False: "; int8 products saturate"}[self.int8_exact]
        return (f"{self.name} ({self.machine}, {self.capability}, {self.threads} threads; flags {flags}"
                + (f"; GFLOP/s {speeds}" if speeds else "") + exact + ")")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["flags"] = sorted(self.flags)
        data["native_bf16"], data["native_int8"] = self.native_bf16, self.native_int8
        return data


# -- reading the device ----------------------------------------------------------------------------

def _linux_cpuinfo() -> tuple[str, set[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", set()
    name, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not name:
            name = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return name, flags


def _macos_cpuinfo() -> tuple[str, set[str]]:
    def sysctl(key: str) -> str:
        try:
            return subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    flags = set()
    for feature, flag in (("FEAT_BF16", "bf16"), ("FEAT_I8MM", "i8mm"), ("FEAT_DotProd", "asimddp")):
        if sysctl(f"hw.optional.arm.{feature}") == "1":
            flags.add(flag)
    for feature, flag in (("avx2_0", "avx2"), ("avx512f", "avx512f"), ("avx512vnni", "avx512_vnni")):
        if sysctl(f"hw.optional.{feature}") == "1":
            flags.add(flag)
    return sysctl("machdep.cpu.brand_string"), flags


def cpu_name_and_flags() -> tuple[str, frozenset[str]]:
    """The CPU's model name and which of :data:`NOTABLE_FLAGS` it reports."""
    name, flags = _macos_cpuinfo() if sys.platform == "darwin" else _linux_cpuinfo()
    return name or platform.processor() or "unknown CPU", frozenset(f for f in flags if f in NOTABLE_FLAGS)


def _time_products(fns: dict[str, Callable[[], object]], flops: float, budget_s: float = 0.015,
                   max_rounds: int = 60) -> dict[str, float]:
    """GFLOP/s of each of ``fns``: its fastest call after a warm-up (a busy neighbour only ever makes calls
    slower), the kinds timed in alternation so that a busy phase of the machine hits them all alike.

    A kind whose second call (after the kernel-building first) alone takes a third of the budget is clearly slow:
    one more call says how slow, more would only cost time.
    """
    best, slow = {}, set()
    for name, fn in fns.items():
        fn()  # first call: kernel selection, primitive creation
        # The second call says whether a kind is slow: the first includes building its kernel, which for a bf16
        # AMX product took several ms in a fresh process — judged on it, bf16 was measured from one or two cold
        # calls at 0.15x fp32 where it runs 1.7x (ds quickstart then trained in fp32).
        start = time.perf_counter()
        fn()
        took = time.perf_counter() - start
        if took > budget_s / 3:
            slow.add(name)
        best[name] = took
    # Wake the thread pool and the cores first: the first ~10 ms of a fresh process ran every product 4-6x slower
    # (unevenly across kinds), which once made bf16 look 1.2x fp32 on a CPU where it is 1.7x.
    start, fast = time.perf_counter(), [fn for name, fn in fns.items() if name not in slow]
    while fast and time.perf_counter() - start < budget_s:
        for fn in fast:
            fn()
    spent, rounds = 0.0, 0
    while rounds < max_rounds and (rounds < 2 or spent < budget_s):
        for name, fn in fns.items():
            if name in slow and rounds >= 1:
                continue
            start = time.perf_counter()
            fn()
            took = time.perf_counter() - start
            best[name], spent = min(best[name], took), spent + took
        rounds += 1
    return {name: flops / t / 1e9 for name, t in best.items()}


# Below this, an fp32 product of PROBE_SHAPE is not the hardware's speed but a machine too busy to measure (any
# x86-64 or Arm core since 2013 exceeds it several times over on one thread): the probe waits and tries again.
PLAUSIBLE_FP32_GFLOPS = 10.0


@functools.lru_cache(maxsize=None)
def measure_products(shape: tuple[int, int, int] = PROBE_SHAPE, threads: int = 0,
                     kinds: tuple[str, ...] = ("fp32", "bf16", "int8")) -> dict[str, float]:
    """``kinds`` of ``[M, K] @ [K, N]`` products on this CPU (fp32, bf16, int8 via ``torch._int_mm``), in G(FL)OP/s.

    Tens of milliseconds (one extra call where a kernel is very slow); cached per shape and thread count
    (``threads`` is part of the cache key only). On a machine so busy that fp32 looks implausibly slow, up to
    three more attempts are made; the best of them is kept.
    """
    m, k, n = shape
    flops = 2.0 * m * k * n
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    fns: dict[str, Callable[[], object]] = {}
    if "fp32" in kinds:
        fns["fp32"] = lambda: a @ b
    if "bf16" in kinds:
        a16, b16 = a.bfloat16(), b.bfloat16()
        fns["bf16"] = lambda: a16 @ b16
    if "int8" in kinds:
        ai = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen)
        bi = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=gen)
        try:
            torch._int_mm(ai, bi)
            fns["int8"] = lambda: torch._int_mm(ai, bi)
        except RuntimeError:  # a build or shape the int8 kernel refuses
            pass
    out = _time_products(fns, flops)
    floor = PLAUSIBLE_FP32_GFLOPS * (m / PROBE_SHAPE[0] if m < PROBE_SHAPE[0] else 1.0)
    for _ in range(3):
        if "fp32" not in out or out["fp32"] >= floor:
            break
        time.sleep(0.05)  # let a burst of other work pass
        again = _time_products(fns, flops)
        if again["fp32"] > out["fp32"]:
            out = again
    return out


@functools.lru_cache(maxsize=None)
def int8_products_exact_probe() -> Optional[bool]:
    """Whether ``torch._int_mm`` is exact where 16-bit pair sums would saturate (about a millisecond, cached).

    Without VNNI, oneDNN's int8 path shifts the first operand to uint8 (+128) and multiplies pairs with
    ``vpmaddubsw``, whose 16-bit sums saturate once a pair of ``(a + 128) * b`` passes 32,767: rows with large
    positive values times columns with large weights come out wrong, silently. The flags cannot tell (a VM or
    ``ONEDNN_MAX_CPU_ISA=AVX2`` caps the ISA below what ``/proc/cpuinfo`` lists), so the product is checked
    against an int64 reference on operands built to saturate. None where ``_int_mm`` refuses to run.
    """
    gen = torch.Generator().manual_seed(0)
    m, k, n = INT8_EXACT_PROBE_SHAPE
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen)
    b = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=gen)
    a[0], b[:, 0] = 127, 127  # an extreme row and column: their pair sums reach 2 * 255 * 127 after the shift
    try:
        out = torch._int_mm(a, b)
    except RuntimeError:
        return None
    return bool(torch.equal(out.long(), a.long() @ b.long()))


@functools.lru_cache(maxsize=None)
def _cpu_profile(threads: int, measure: bool) -> HardwareProfile:
    name, flags = cpu_name_and_flags()
    measured = {}
    if measure:
        measured.update(measure_products(PROBE_SHAPE, threads))
        decode = measure_products(DECODE_SHAPE, threads, ("fp32", "bf16"))
        measured.update({f"{kind}_decode": value for kind, value in decode.items()})
    exact = int8_products_exact_probe() if measure else None
    return HardwareProfile("cpu", name, platform.machine(), torch.backends.cpu.get_cpu_capability(), flags,
                           threads, dict(measured), int8_exact=exact)


def hardware_profile(device: str | torch.device = "cpu", *, measure: bool = True) -> HardwareProfile:
    """The profile of ``device`` (a CPU is probed unless ``measure=False``); cached per process and thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return HardwareProfile("cuda", torch.cuda.get_device_name(index), platform.machine(), f"sm_{major}{minor}",
                               threads=torch.get_num_threads(), cuda_bf16=torch.cuda.is_bf16_supported())
    return _cpu_profile(torch.get_num_threads(), measure)


# -- decisions (pure functions of a profile) -------------------------------------------------------

def bf16_products_fast(profile: HardwareProfile, workload: str = "train") -> bool:
    """bf16 products are worth converting to for ``workload`` (``train``: token blocks; ``decode``: one row per
    sequence): native instructions and, where probed, ≥ BF16_MIN_SPEEDUP x fp32 at that workload's shape."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload {workload!r}: valid workloads are {', '.join(WORKLOADS)}")
    if not profile.native_bf16:
        return False
    speedup = profile.speedup("bf16" if workload == "train" else "bf16_decode", "fp32" if workload == "train"
                              else "fp32_decode")
    return speedup is None or speedup >= BF16_MIN_SPEEDUP


def int8_products_exact(profile: HardwareProfile) -> bool:
    """int8 x int8 products accumulate without 16-bit saturation: the probe's answer where it ran
    (:func:`int8_products_exact_probe`), else the flags (VNNI, AMX, Arm dot products; always on CUDA)."""
    if profile.device_type == "cuda":
        return True
    return profile.int8_exact if profile.int8_exact is not None else profile.native_int8


def int8_products_fast(profile: HardwareProfile) -> bool:
    """int8 x int8 products (``torch._int_mm``) beat fp32: 32-bit-accumulating int8 instructions, exact where
    probed (:func:`int8_products_exact`), and, where probed, at least fp32's throughput. Without VNNI, oneDNN's
    AVX2 path is ~38x slower than fp32 and saturates 16-bit pair sums."""
    if profile.device_type == "cuda":
        return False  # our int8 modules dequantize on CUDA: _int_mm there wants M > 16 and aligned shapes
    if not profile.native_int8 or not int8_products_exact(profile):
        return False
    speedup = profile.speedup("int8")
    return speedup is None or speedup >= INT8_MIN_SPEEDUP


@dataclass(frozen=True)
class PrecisionChoice:
    """What a precision setting means on a device: the resolved name, its autocast dtype and why."""

    requested: str
    precision: str                    # fp32, bf16 or fp16
    reason: str
    warning: Optional[str] = None     # set when an explicit choice is slow here

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    def to_dict(self) -> dict:
        return {"requested": self.requested, "precision": self.precision, "reason": self.reason}


def _bf16_evidence(profile: HardwareProfile, workload: str = "train") -> str:
    speedup = (profile.speedup("bf16") if workload == "train" else profile.speedup("bf16_decode", "fp32_decode"))
    shape = "" if workload == "train" else " for one-token rows (decoding)"
    measured = f"bf16 products {speedup:.2g}x fp32{shape} measured" if speedup is not None else "not measured"
    flags = [f for f in BF16_FLAGS if f in profile.flags]
    return f"{'native bf16 (' + ', '.join(flags) + ')' if flags else 'no native bf16 instructions'}; {measured}"


def choose_precision(requested: str, profile: HardwareProfile, workload: str = "train") -> PrecisionChoice:
    """Resolve ``auto``/``fp32``/``bf16``/``fp16`` for a device and a workload (``train``: training, evaluation,
    prefill; ``decode``: generation and serving, where products are one row per sequence).

    ``auto``: on CUDA bf16 where supported, else fp16; on a CPU bf16 only where :func:`bf16_products_fast` for
    the workload, else fp32 (even AMX-bf16 CPUs run a one-row product slower in bf16 than in fp32). An explicit ``bf16`` on a CPU where it is slow is honoured with a warning that says by how much;
    ``fp16`` on a CPU is refused (a ValueError; its products are ~15x slower than fp32 and autocast does not
    cover it).
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r}: valid values are {', '.join(PRECISIONS)}")
    if profile.device_type == "cuda":
        if requested == "auto":
            if profile.cuda_bf16:
                return PrecisionChoice(requested, "bf16", f"auto: {profile.name} ({profile.capability}) supports bf16")
            return PrecisionChoice(requested, "fp16", f"auto: {profile.name} ({profile.capability}) has no bf16; "
                                                      f"fp16 with a gradient scaler")
        return PrecisionChoice(requested, requested, "set explicitly")
    if requested == "fp16":
        raise ValueError("precision=fp16 needs CUDA: on CPU fp16 matmuls are ~15x slower than fp32 "
                         "(use precision=auto)")
    fast = bf16_products_fast(profile, workload)
    if requested == "auto":
        return PrecisionChoice(requested, "bf16" if fast else "fp32", f"auto: {_bf16_evidence(profile, workload)}")
    if requested == "bf16" and not fast:
        speedup = (profile.speedup("bf16") if workload == "train" else profile.speedup("bf16_decode", "fp32_decode"))
        slower = f"{1 / speedup:.2g}x slower than fp32 (measured)" if speedup else "slower than fp32"
        warning = (f"precision=bf16 on {profile.name}: bf16 products run {slower} here "
                   f"({_bf16_evidence(profile, workload)}); set precision=auto (or fp32) to run at full speed")
        return PrecisionChoice(requested, "bf16", "set explicitly", warning)
    return PrecisionChoice(requested, requested, "set explicitly")


_warned: set[str] = set()


def warn_once(message: Optional[str]) -> None:
    """Warn with ``message`` once per process (a slow explicit precision is said once, not per step)."""
    if message and message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def resolve_precision(requested: str, device: str | torch.device = "cpu", workload: str = "train") -> PrecisionChoice:
    """:func:`choose_precision` for this process's ``device``, warning once when the choice is slow here."""
    choice = choose_precision(requested, hardware_profile(device, measure=requested in ("auto", "bf16")), workload)
    warn_once(choice.warning)
    return choice


def autocast(choice: PrecisionChoice, device_type: str = "cpu"):
    """The autocast context of a choice (a no-op context for fp32)."""
    import contextlib

    dtype = choice.autocast_dtype
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def describe_for_benchmarks() -> dict:
    """Machine facts every benchmark prints with its results: CPU model, notable flags, torch capability."""
    name, flags = cpu_name_and_flags()
    return {"cpu": name, "machine": platform.machine(), "flags": sorted(flags),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores_visible": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}


# -- ceilings: what MFU and MBU are quoted against ----------------------------------------------------

PEAK_MATMUL_N = 2048     # docs/benchmarks.md's MFU peak: an n x n product, large enough to run at the BLAS's best
SLOW_PEAK_MATMUL_N = 256  # where a precision's products are slow here (bf16 on AVX2: ~100x fp32), a smaller one
STREAM_BYTES = 64 << 20   # per operand of the bandwidth stream: past any last-level cache of today's CPUs


def _best_rate(fn: Callable[[], object], work: float, seconds: float) -> float:
    """``work`` per second of ``fn``'s best burst (after two warm-up calls, bursts of 0.25 s — at least 3 — filling
    ``seconds``): the ceiling the hardware reaches right now, which a busy neighbour can only lower, so more, shorter
    bursts find it more surely (a 3-burst bf16 peak read 895 against 1,133 GFLOP/s measured minutes apart)."""
    fn()
    fn()
    best = 0.0
    bursts = max(3, round(seconds / 0.25))
    for _ in range(bursts):
        count, start = 0, time.perf_counter()
        while count == 0 or time.perf_counter() - start < seconds / bursts:
            fn()
            count += 1
        best = max(best, work * count / (time.perf_counter() - start))
    return best


@functools.lru_cache(maxsize=None)
def matmul_peak_flops(precision: str = "fp32", threads: int = 0, n: int = 0, seconds: float = 0.6) -> float:
    """Measured FLOP/s of an ``n x n`` product in ``precision`` (fp32 or bf16): the peak MFU is quoted against.

    ``n`` 0 = :data:`PEAK_MATMUL_N`, unless one product of that size would take longer than 2 s at the rate of a
    :data:`SLOW_PEAK_MATMUL_N` product timed first (bf16 where the CPU runs it ~100x slower than
    fp32: one 2048² product takes seconds); then :data:`SLOW_PEAK_MATMUL_N`. Decided by timing, not by CPU flags,
    which an ISA-limited run (``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``) does not change. Cached per process,
    precision, thread count (``threads`` is a cache key only) and size.
    """
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(precision)
    if dtype is None:
        raise ValueError(f"precision {precision!r}: peaks are measured for fp32 and bf16")
    if n <= 0:
        small = torch.randn(SLOW_PEAK_MATMUL_N, SLOW_PEAK_MATMUL_N).to(dtype)
        small @ small  # kernel selection, first-touch
        took = []
        for _ in range(3):  # best of 3: one product of microseconds is at the mercy of a thread wake-up
            start = time.perf_counter()
            small @ small
            took.append(time.perf_counter() - start)
        rate = 2.0 * SLOW_PEAK_MATMUL_N ** 3 / max(min(took), 1e-9)
        # 2 s for one large product separates the cases by ~40x each way: slow bf16 projects ~17 s, fp32 < 0.5 s
        n = PEAK_MATMUL_N if 2.0 * PEAK_MATMUL_N ** 3 / rate <= 2.0 else SLOW_PEAK_MATMUL_N
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen).to(dtype), torch.randn(n, n, generator=gen).to(dtype)
    return _best_rate(lambda: a @ b, 2.0 * n ** 3, seconds)


@functools.lru_cache(maxsize=None)
def memory_bandwidth(threads: int = 0, nbytes: int = STREAM_BYTES, seconds: float = 0.6) -> float:
    """Measured memory bandwidth in bytes/s: ``c = a + b`` over fp32 operands of ``nbytes`` each (STREAM's "add":
    two operands read, one written, 3 x ``nbytes`` per pass). Cached like :func:`matmul_peak_flops`."""
    n = max(nbytes // 4, 1)
    a, b, c = torch.ones(n), torch.ones(n), torch.empty(n)
    return _best_rate(lambda: torch.add(a, b, out=c), 3.0 * 4 * n, seconds)
