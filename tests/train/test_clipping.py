"""Gradient clipping: fixed and none modes, the dynamic threshold, non-finite norms, resumable state."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from deepseek.config import ConfigError
from deepseek.train import ClipConfig, GradientClipper


def total_norm(model: nn.Module) -> float:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()


def set_grads(model: nn.Module, norm: float, gen: torch.Generator) -> None:
    """Random gradients whose total L2 norm is exactly ``norm``."""
    grads = [torch.randn(p.shape, generator=gen) for p in model.parameters()]
    scale = norm / torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item()
    for p, g in zip(model.parameters(), grads):
        p.grad = g * scale


def steady_norms(n: int, seed: int = 0) -> list[float]:
    """Norms around 1 with 5% noise, as in a stable stretch of training."""
    gen = torch.Generator().manual_seed(seed)
    return (1.0 + 0.05 * torch.randn(n, generator=gen)).tolist()


@pytest.fixture
def model():
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def test_dynamic_leaves_steady_norms_alone_and_clips_a_spike(model):
    # max_norm is the ceiling; set it well above the norms so that only the dynamic rule acts.
    clipper = GradientClipper(ClipConfig(mode="dynamic", max_norm=10.0))
    gen = torch.Generator().manual_seed(1)
    norms = steady_norms(200)
    norms[150] *= 50
    results = []
    for step, norm in enumerate(norms):
        set_grads(model, norm, gen)
        result = clipper(model.parameters())
        assert result.grad_norm == pytest.approx(norm, rel=1e-5)
        if step == 150:
            assert result.clipped and result.threshold < 2.0
            assert total_norm(model) <= result.threshold * 1.01
            assert total_norm(model) >= result.threshold * 0.99
        results.append(result)
    normal = [r for i, r in enumerate(results) if i != 150]
    assert sum(r.clipped for r in normal) <= 0.01 * len(normal)
    assert all(r.threshold == 10.0 for r in results[:20])  # warm-up: max_norm only
    # The spike entered the statistics as the threshold: the threshold barely moves and the
    # following normal steps are not clipped.
    assert results[151].threshold < results[150].threshold * 1.1
    assert not any(r.clipped for r in results[151:])
    assert 1.1 < results[-1].threshold < 1.5  # about exp(3 sigma) above the typical norm


def test_dynamic_follows_a_lasting_rise(model):
    """A genuine change of scale lifts the threshold instead of being clipped forever."""
    clipper = GradientClipper(ClipConfig(mode="dynamic", max_norm=100.0))
    gen = torch.Generator().manual_seed(2)
    for norm in steady_norms(100):
        set_grads(model, norm, gen)
        clipper(model.parameters())
    results = []
    for norm in steady_norms(300, seed=1):
        set_grads(model, 4 * norm, gen)
        results.append(clipper(model.parameters()))
    assert results[0].clipped
    assert not any(r.clipped for r in results[-50:])


def test_dynamic_threshold_is_capped_by_max_norm(model):
    clipper = GradientClipper(ClipConfig(mode="dynamic", max_norm=0.5, warmup_steps=5))
    gen = torch.Generator().manual_seed(3)
    for norm in steady_norms(50):
        set_grads(model, norm, gen)
        result = clipper(model.parameters())
        assert result.clipped and result.threshold <= 0.5
        assert total_norm(model) <= 0.5 * 1.0001


def test_fixed_clips_exactly_above_max_norm(model):
    clipper = GradientClipper(ClipConfig(mode="fixed", max_norm=1.0))
    gen = torch.Generator().manual_seed(4)
    for norm in [0.5, 0.999, 1.001, 3.0, 0.2, 50.0]:
        set_grads(model, norm, gen)
        result = clipper(model.parameters())
        assert result.threshold == 1.0
        assert result.clipped == (result.grad_norm > 1.0)
        assert total_norm(model) == pytest.approx(min(norm, 1.0), rel=1e-5)


def test_none_never_clips_but_reports(model):
    clipper = GradientClipper(ClipConfig(mode="none"))
    set_grads(model, 123.0, torch.Generator().manual_seed(5))
    result = clipper(model.parameters())
    assert not result.clipped and result.threshold == math.inf
    assert result.grad_norm == pytest.approx(123.0, rel=1e-5)
    assert total_norm(model) == pytest.approx(123.0, rel=1e-5)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("mode", ["fixed", "dynamic"])
def test_non_finite_norm_is_reported_and_touches_nothing(model, bad, mode):
    clipper = GradientClipper(ClipConfig(mode=mode, max_norm=10.0, warmup_steps=3))
    gen = torch.Generator().manual_seed(6)
    for norm in steady_norms(10):
        set_grads(model, norm, gen)
        clipper(model.parameters())
    state = clipper.state_dict()
    set_grads(model, 1.0, gen)
    next(model.parameters()).grad[0, 0] = bad
    grads = [p.grad.clone() for p in model.parameters()]
    result = clipper(model.parameters())
    assert result.clipped and not result.finite
    assert math.isinf(result.grad_norm) if bad == math.inf else math.isnan(result.grad_norm)
    assert clipper.state_dict() == state
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)


def test_no_gradients(model):
    result = GradientClipper(ClipConfig())(model.parameters())
    assert result.grad_norm == 0.0 and not result.clipped


def test_state_dict_round_trip_continues_identically(model):
    cfg = ClipConfig(mode="dynamic", max_norm=10.0)
    a = GradientClipper(cfg)
    gen = torch.Generator().manual_seed(7)
    norms = steady_norms(120)
    norms[80] *= 20
    for norm in norms[:60]:
        set_grads(model, norm, gen)
        a(model.parameters())
    b = GradientClipper(cfg)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for norm in norms[60:]:
        set_grads(model, norm, gen)
        grads = [p.grad.clone() for p in model.parameters()]
        ra = a(model.parameters())
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        rb = b(model.parameters())
        assert ra == rb
    assert a.state_dict() == b.state_dict()
    with pytest.raises(ValueError, match="missing"):
        b.load_state_dict({"count": 1})


def test_clip_config_validates():
    with pytest.raises(ConfigError, match="max_norm"):
        ClipConfig(max_norm=0.0)
    with pytest.raises(ConfigError, match="mode"):
        ClipConfig(mode="adaptive")
