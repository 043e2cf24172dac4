"""Every MoE dispatch directly against the loop reference, which dispatch LocalDispatch picks when, and the layer
config built from the model config."""

from __future__ import annotations

import pytest
import torch

from deepseek.models import ModelConfig, MoETransformer
from deepseek.models.transformer import moe_config
from deepseek.nn import GroupedExperts, MoE, few_rows
from deepseek.nn import dispatch as dispatch_module
from deepseek.nn.dispatch import FEW_PAIRS, GATHERED, HOST_GROUPED, LOOP, SORTED, LocalDispatch
from deepseek.nn.experts import GroupedProduct
from deepseek.nn.few_rows import ARRANGEMENTS, candidates

E, D, FFN, K = 8, 32, 24, 2


def experts_and_routing(N: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    experts = GroupedExperts(E, D, FFN)
    with torch.no_grad():
        experts.gate_up.copy_(torch.randn(experts.gate_up.shape, generator=gen) * 0.2)
        experts.down.copy_(torch.randn(experts.down.shape, generator=gen) * 0.2)
    x = torch.randn(N, D, generator=gen)
    choices = torch.rand(N, E, generator=gen).argsort(dim=-1)[:, :K]
    if N > 2:
        choices[: N // 2, 0] = 3  # several tokens share an expert, so host groups have more than one row
    weights = torch.rand(N, K, generator=gen) + 0.1
    return experts, x, weights, choices


# -- each dispatch == the loop reference ---------------------------------------------------------------

@pytest.mark.parametrize("N", [1, 2, 5, 8])
@pytest.mark.parametrize("arrangement", [a for a in ARRANGEMENTS if a != "transposed_copy"])
def test_host_grouped_dispatch_equals_reference(N, arrangement, few_row_arrangement):
    """The CPU decoding dispatch (one token: a weighted sum; a few: host-sorted groups) with every few-row
    arrangement it may be measured to prefer."""
    few_row_arrangement(arrangement)
    experts, x, weights, choices = experts_and_routing(N)
    with torch.no_grad():
        got = HOST_GROUPED(x, weights, choices, experts)
        want = experts.forward_reference(x, weights, choices)
    if arrangement in candidates(N, has_transposed=False):
        assert set(few_rows.chosen_arrangements().values()) == {arrangement}
    assert got.shape == (N, D) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dispatch", [SORTED, HOST_GROUPED, GATHERED], ids=["sorted", "host_grouped", "gathered"])
@pytest.mark.parametrize("N", [1, 3, 16, 40])
def test_every_local_dispatch_equals_reference(dispatch, N):
    experts, x, weights, choices = experts_and_routing(N, seed=N)
    with torch.no_grad():
        torch.testing.assert_close(dispatch(x, weights, choices, experts),
                                   experts.forward_reference(x, weights, choices), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dispatch", [SORTED, HOST_GROUPED, GATHERED], ids=["sorted", "host_grouped", "gathered"])
def test_bf16_autocast_dispatch_close_to_fp32_reference(dispatch):
    experts, x, weights, choices = experts_and_routing(6)
    with torch.no_grad():
        want = experts.forward_reference(x, weights, choices)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = dispatch(x, weights, choices, experts)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).norm() / want.norm() < 2e-2


def test_grouped_product_with_no_rows_gives_zero_gradients():
    """An expert-parallel rank may receive no rows: the weights still get a (zero) gradient, not None."""
    gate_up = torch.randn(2, 2 * FFN, D, requires_grad=True)
    down = torch.randn(2, D, FFN, requires_grad=True)
    counts = torch.zeros(2, dtype=torch.int32)
    y = GroupedProduct(gate_up, down).grouped(torch.zeros(0, D), counts, counts.cumsum(0, dtype=torch.int32))
    assert y.shape == (0, D)
    y.sum().backward()
    assert gate_up.grad is not None and gate_up.grad.abs().sum() == 0 and down.grad.abs().sum() == 0


# -- which dispatch LocalDispatch picks -----------------------------------------------------------------

@pytest.fixture
def picked(monkeypatch):
    """The names of the dispatches LocalDispatch called, in order."""
    calls = []
    for name in ("SORTED", "HOST_GROUPED", "GATHERED", "LOOP"):
        real = getattr(dispatch_module, name)
        monkeypatch.setattr(dispatch_module, name,
                            lambda *args, _real=real, _name=name: calls.append(_name) or _real(*args))
    return calls


def test_local_dispatch_picks_by_size_gradient_and_compute(picked):
    local = LocalDispatch()
    few, x_few, w_few, c_few = experts_and_routing(FEW_PAIRS // K)
    _, x_many, w_many, c_many = experts_and_routing(FEW_PAIRS // K + 1)
    with torch.no_grad():
        local(x_few, w_few, c_few, few)
        local(x_many, w_many, c_many, few)
    local(x_few, w_few, c_few, few)  # gradients enabled: always sorted
    assert picked == ["HOST_GROUPED", "SORTED", "SORTED"]


def test_compiled_decoding_gathers_only_where_the_compute_can(picked, monkeypatch):
    experts, x, weights, choices = experts_and_routing(2)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        LocalDispatch()(x, weights, choices, experts)
        LocalDispatch(gathered=False)(x, weights, choices, experts)  # quantized weights: grouped on the host
    assert picked == ["GATHERED", "HOST_GROUPED"]


def test_exporting_takes_the_loop(picked, monkeypatch):
    experts, x, weights, choices = experts_and_routing(2)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    with torch.no_grad():
        LocalDispatch()(x, weights, choices, experts)
    assert picked == ["LOOP"]


def test_the_dispatcher_is_a_swap_point():
    """Installing another dispatcher changes the path, not the result (what expert parallelism does)."""
    experts, x, weights, choices = experts_and_routing(5)
    assert isinstance(experts.dispatcher, LocalDispatch)
    with torch.no_grad():
        local = experts(x, weights, choices)
        experts.dispatcher = LOOP
        torch.testing.assert_close(experts(x, weights, choices), local, atol=1e-5, rtol=1e-5)


# -- the layer config ---------------------------------------------------------------------------------------

def test_moe_layers_are_built_from_the_model_config():
    cfg = ModelConfig(d_model=32, n_heads=2, n_kv_heads=1, moe_ffn_dim=16, n_routed_experts=6, top_k=3,
                      router="sigmoid", n_shared_experts=2, shared_expert_gate=True, norm_topk_prob=False,
                      routed_scaling_factor=2.5, aux_loss_coef=0.01, bias_update_speed=0.003)
    layer_cfg = moe_config(cfg)
    with pytest.raises(AttributeError):
        layer_cfg.d_model = 8  # frozen
    moe = MoETransformer(cfg).blocks[0].ffn
    assert isinstance(moe, MoE)
    router, experts = moe.router, moe.experts
    assert (router.n_experts, router.top_k, router.kind, router.norm_topk_prob, router.scaling, router.aux_loss_coef,
            router.bias_update_speed) == (6, 3, "sigmoid", False, 2.5, 0.01, 0.003)
    assert tuple(router.weight.shape) == (6, 32)
    assert tuple(experts.gate_up.shape) == (6, 32, 32) and tuple(experts.down.shape) == (6, 32, 16)
    assert moe.shared.gate.out_features == 2 * 16 and moe.shared_gate is not None
