"""``x @ w.T`` for a handful of rows (decoding), in whichever arrangement this CPU runs fastest for the shape.

Decoding reads every weight once per step for one to a few rows, and how fast CPU BLAS streams a weight then
depends on the CPU and the arrangement of the product, not only its size. Measured (µs, 2 threads):

=====================  ==========  ============  ========  ==========================
[O, I] x M rows        ``F.linear``  ``w @ x.T``   mul+sum   CPU
=====================  ==========  ============  ========  ==========================
[1024, 256] x 1        ~3x slower   —             fastest   AMD Zen 5 (AVX-512)
[1024, 256] x 1        9.7          11.1          22.2      Intel Sapphire Rapids
[1024, 256] x 8        20.8         34.2          —         Intel Sapphire Rapids
[1024, 256] x 8        40.5         26.6          —         the same, held to AVX2
[8192, 256] x 8        432.7        268.1         —         Intel Sapphire Rapids
=====================  ==========  ============  ========  ==========================

So no arrangement is right everywhere: the first product of each (rows, shape, dtype, threads) times the
candidates a few times and remembers the fastest for the rest of the process (a few milliseconds once, like
cuBLAS's or oneDNN's own heuristics). The candidates differ only in summation order (results agree to fp32
rounding; ``tests/nn/test_few_rows.py`` checks each against ``F.linear``).
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

_scratch = threading.local()  # per-thread product buffer of the mul+sum arrangement
_chosen: dict[tuple, str] = {}
TIMED_CALLS = 5


def _linear(x_MI: torch.Tensor, w_OI: torch.Tensor, w_IO: Optional[Callable[[], torch.Tensor]]) -> torch.Tensor:
    return F.linear(x_MI, w_OI)


def _weight_first(x_MI: torch.Tensor, w_OI: torch.Tensor, w_IO) -> torch.Tensor:
    # Row-major x, so that x.T is a column-major view: BLAS streams W 2-4x slower when given a row-major [I, M]
    # operand (a down projection fed the transposed-view output of its gate_up product ran at 1/3 speed).
    return (w_OI @ x_MI.contiguous().t()).t()


def _mul_sum(x_MI: torch.Tensor, w_OI: torch.Tensor, w_IO) -> torch.Tensor:
    # One row: a broadcast multiply into a reused buffer (a fresh weight-sized tensor per call costs page faults)
    # and row sums.
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < w_OI.numel() or buffer.dtype != w_OI.dtype or buffer.device != w_OI.device:
        with torch.inference_mode(False):  # a normal tensor may be written both in and out of inference mode
            buffer = _scratch.buffer = torch.empty(w_OI.numel(), dtype=w_OI.dtype, device=w_OI.device)
    product = buffer[: w_OI.numel()].view(w_OI.shape)
    torch.mul(w_OI, x_MI, out=product)
    return product.sum(dim=-1).unsqueeze(0)


def _transposed_copy(x_MI: torch.Tensor, w_OI: torch.Tensor, w_IO) -> torch.Tensor:
    return x_MI @ w_IO()


ARRANGEMENTS: dict[str, Callable] = {"linear": _linear, "weight_first": _weight_first, "mul_sum": _mul_sum,
                                     "transposed_copy": _transposed_copy}


def candidates(rows: int, has_transposed: bool) -> list[str]:
    names = ["linear", "weight_first"]
    if rows == 1:
        names.append("mul_sum")
        if has_transposed:
            names.append("transposed_copy")
    return names


def _fastest(x_MI: torch.Tensor, w_OI: torch.Tensor, w_IO, names: list[str]) -> str:
    best, choice = float("inf"), names[0]
    for name in names:
        fn = ARRANGEMENTS[name]
        fn(x_MI, w_OI, w_IO)  # warm-up: allocation, kernel selection, the transposed copy
        took = float("inf")
        for _ in range(TIMED_CALLS):
            start = time.perf_counter()
            fn(x_MI, w_OI, w_IO)
            took = min(took, time.perf_counter() - start)
        if took < best:
            best, choice = took, name
    return choice


def few_row_linear(x_MI: torch.Tensor, w_OI: torch.Tensor, *, transposed: Optional[Callable[[], torch.Tensor]] = None,
                   arrangement: Optional[str] = None) -> torch.Tensor:
    """``x @ w.T`` ([M, O]) for a few rows of ``x`` [M, I] on a CPU, arranged as this CPU streams ``w`` fastest.

    ``transposed`` (optional) returns a contiguous [I, O] copy of ``w`` kept by the caller, which adds that
    arrangement to the candidates for one row (the head's cached copy). ``arrangement`` forces one of
    :data:`ARRANGEMENTS` (tests, benchmarks).
    """
    if arrangement is None:
        key = (x_MI.shape[0], *w_OI.shape, w_OI.dtype, torch.get_num_threads(), transposed is not None)
        arrangement = _chosen.get(key)
        if arrangement is None:
            arrangement = _chosen[key] = _fastest(x_MI, w_OI, transposed, candidates(x_MI.shape[0],
                                                                                     transposed is not None))
    return ARRANGEMENTS[arrangement](x_MI, w_OI, transposed)


def chosen_arrangements() -> dict[tuple, str]:
    """What each (rows, O, I, dtype, threads, has-copy) shape was measured to run fastest as, in this process."""
    return dict(_chosen)
