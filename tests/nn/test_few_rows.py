"""Few-row products (decoding): every arrangement equals F.linear, and the measured choice is remembered."""

import pytest
import torch
import torch.nn.functional as F

from deepseek.nn import few_rows
from deepseek.nn.few_rows import ARRANGEMENTS, candidates, chosen_arrangements, few_row_linear


@pytest.mark.parametrize("rows", [1, 2, 8])
@pytest.mark.parametrize("arrangement", list(ARRANGEMENTS))
def test_every_arrangement_equals_linear(rows, arrangement):
    if arrangement not in candidates(rows, has_transposed=True):
        pytest.skip(f"{arrangement} is a one-row arrangement")
    w = torch.randn(96, 40)
    x = torch.randn(rows, 40)
    copy = w.t().contiguous()
    got = few_row_linear(x, w, transposed=lambda: copy, arrangement=arrangement)
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)
    # a transposed (non-contiguous) input, as the gate_up output feeding a down projection is
    x_t = torch.randn(40, rows).t()
    torch.testing.assert_close(few_row_linear(x_t, w, arrangement=arrangement if arrangement != "transposed_copy"
                                              else "linear"), F.linear(x_t, w), rtol=1e-5, atol=1e-5)


def test_the_fastest_arrangement_is_measured_once_per_shape(monkeypatch):
    monkeypatch.setattr(few_rows, "_chosen", {})
    timed = []
    real = few_rows._fastest

    def counting(*args):
        timed.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(few_rows, "_fastest", counting)
    w = torch.randn(64, 32)
    for _ in range(3):
        few_row_linear(torch.randn(2, 32), w)
        few_row_linear(torch.randn(1, 32), w)
    assert len(timed) == 2  # one measurement per (rows, shape, dtype, threads)
    assert set(chosen_arrangements().values()) <= set(ARRANGEMENTS)
    assert {k[0] for k in chosen_arrangements()} == {1, 2}
