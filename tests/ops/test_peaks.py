"""The measured ceilings: positive, cached per process, and a bad precision is refused."""

import pytest

from deepseek.hardware import matmul_peak_flops, memory_bandwidth


def test_ceilings_are_measured_once_per_process():
    flops = matmul_peak_flops("fp32", 1, n=64, seconds=0.01)
    assert flops > 0 and matmul_peak_flops("fp32", 1, n=64, seconds=0.01) == flops  # cached, not re-measured
    bandwidth = memory_bandwidth(1, nbytes=1 << 20, seconds=0.01)
    assert bandwidth > 0 and memory_bandwidth(1, nbytes=1 << 20, seconds=0.01) == bandwidth


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="fp32 and bf16"):
        matmul_peak_flops("fp16", 1, n=64, seconds=0.01)
