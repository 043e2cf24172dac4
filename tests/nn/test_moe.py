"""MoE: grouped sparse dispatch against the naive per-expert loop, routers, balancing, aux loss, autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from deepseek.models import ModelConfig, MoETransformer
from deepseek.nn import GroupedExperts, MoE, MoEConfig, Router, RouterConfig, load_balancing_loss, update_router_biases


def init_(module: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    """The nn modules allocate with torch.empty; give every parameter finite random values."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def random_routing(N: int, E: int, K: int, generator: torch.Generator | None = None):
    """K distinct experts per token and positive weights: ([N, K] float, [N, K] long)."""
    experts = torch.rand(N, E, generator=generator).argsort(dim=-1)[:, :K]
    weights = torch.rand(N, K, generator=generator) + 0.1
    return weights, experts


def run_both(experts: GroupedExperts, x, weights, idx):
    """Outputs and grads (x, weights, gate_up, down) of the fast path and of the reference."""
    results = []
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    for fn in (experts.forward, experts.forward_reference):
        experts.zero_grad(set_to_none=True)
        x_ = x.detach().clone().requires_grad_(True)
        w_ = weights.detach().clone().requires_grad_(True)
        y = fn(x_, w_, idx)
        (y * grad_out).sum().backward()
        results.append((y.detach(), x_.grad, w_.grad, experts.gate_up.grad.clone(), experts.down.grad.clone()))
    return results


# -- GroupedExperts: dispatch == reference ---------------------------------------------------------

@pytest.mark.parametrize("E, K", [(1, 1), (8, 1), (8, 2), (8, 8), (64, 1), (64, 2), (64, 8)])
def test_grouped_dispatch_matches_reference(E, K):
    N, D, Fd = 12, 16, 24
    experts = init_(GroupedExperts(E, D, Fd))
    x = torch.randn(N, D)
    weights, idx = random_routing(N, E, K)
    if E == 64:  # with 12 tokens most of the 64 experts receive nothing
        assert torch.bincount(idx.flatten(), minlength=E).eq(0).sum() > 0
    (y, gx, gw, ggu, gd), (y_ref, gx_ref, gw_ref, ggu_ref, gd_ref) = run_both(experts, x, weights, idx)
    assert y.shape == (N, D) and y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, gw_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ggu, ggu_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gd, gd_ref, atol=1e-5, rtol=1e-5)


def test_idle_experts_get_zero_grads_and_output_is_weighted_sum():
    E, D, Fd = 8, 16, 8
    experts = init_(GroupedExperts(E, D, Fd))
    x = torch.randn(6, D)
    idx = torch.tensor([[0, 3]] * 3 + [[3, 5]] * 3)  # experts 1, 2, 4, 6, 7 idle
    weights = torch.rand(6, 2)
    (y, _, _, ggu, gd), (y_ref, *_) = run_both(experts, x, weights, idx)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    idle = [1, 2, 4, 6, 7]
    assert ggu[idle].abs().max() == 0 and gd[idle].abs().max() == 0
    assert all(ggu[e].abs().sum() > 0 and gd[e].abs().sum() > 0 for e in (0, 3, 5))

    # Against an explicit formula: y_n = sum_k w_nk * down_e(silu(gate_e x) * up_e x).
    def expert(e, v):
        gate, up = (v @ experts.gate_up[e].T).split(Fd, dim=-1)
        return (F.silu(gate) * up) @ experts.down[e].T
    manual = torch.stack([sum(weights[n, k] * expert(int(idx[n, k]), x[n]) for k in range(2)) for n in range(6)])
    torch.testing.assert_close(y, manual.detach(), atol=1e-5, rtol=1e-5)


def test_all_tokens_to_one_expert():
    experts = init_(GroupedExperts(4, 8, 8))
    x = torch.randn(5, 8)
    idx = torch.full((5, 1), 2)
    weights = torch.ones(5, 1)
    (y, *_), (y_ref, *_) = run_both(experts, x, weights, idx)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(N=st.integers(1, 12), E=st.integers(1, 10), K=st.integers(1, 8), D=st.integers(1, 20),
       Fd=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_dispatch_equals_reference_property(N, E, K, D, Fd, seed):
    K = min(K, E)
    torch.manual_seed(seed)
    experts = init_(GroupedExperts(E, D, Fd))
    x = torch.randn(N, D)
    weights, idx = random_routing(N, E, K, torch.Generator().manual_seed(seed))
    (y, gx, gw, ggu, gd), (y_ref, gx_ref, gw_ref, ggu_ref, gd_ref) = run_both(experts, x, weights, idx)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, gw_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ggu, ggu_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gd, gd_ref, atol=1e-5, rtol=1e-5)


# -- routers ---------------------------------------------------------------------------------------

def test_softmax_router_weights():
    N, D, E, K = 20, 16, 8, 3
    x = torch.randn(N, D)
    router = init_(Router(D, RouterConfig(E, K, "softmax", norm_topk_prob=True)))
    weights, idx = router(x)
    assert weights.dtype == torch.float32 and weights.shape == (N, K) and idx.shape == (N, K)
    torch.testing.assert_close(weights.sum(-1), torch.ones(N))
    probs = (x @ router.weight.T).softmax(-1)
    ref_w, ref_idx = probs.topk(K, dim=-1)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(weights, ref_w / ref_w.sum(-1, keepdim=True))

    router.norm_topk_prob = False
    weights, _ = router(x)
    torch.testing.assert_close(weights, ref_w)
    assert (weights.sum(-1) < 1).all()

    router.norm_topk_prob, router.scaling = True, 2.5
    torch.testing.assert_close(router(x)[0].sum(-1), torch.full((N,), 2.5))

    # Top-1 with renormalisation gives weight 1 (Mixtral); without it, the top probability.
    top1 = Router(D, RouterConfig(E, 1, "softmax", norm_topk_prob=True))
    top1.weight.data.copy_(router.weight)
    w1, idx1 = top1(x)
    assert torch.equal(idx1, ref_idx[:, :1])
    torch.testing.assert_close(w1, torch.ones(N, 1))
    top1.norm_topk_prob = False
    torch.testing.assert_close(top1(x)[0], ref_w[:, :1])


def test_sigmoid_router_bias_changes_choice_not_weights():
    N, D, E, K = 16, 8, 6, 2
    x = torch.randn(N, D)
    router = init_(Router(D, RouterConfig(E, K, "sigmoid", norm_topk_prob=False)))
    scores = (x @ router.weight.T).sigmoid()
    w0, idx0 = router(x)
    torch.testing.assert_close(w0, scores.gather(1, idx0))
    assert torch.equal(idx0, scores.topk(K, dim=-1).indices)

    # Push one expert into every token's choice: the choice changes, the weights stay unbiased scores.
    favoured = int(torch.bincount(idx0.flatten(), minlength=E).argmin())
    router.expert_bias[favoured] = 10.0
    w1, idx1 = router(x)
    assert (idx1 == favoured).any(dim=-1).all()
    assert not torch.equal(idx1, idx0)
    torch.testing.assert_close(w1, scores.gather(1, idx1))
    assert (w1 < 1).all(), "a bias of 10 must not leak into the weights"

    router.norm_topk_prob = True
    w2, idx2 = router(x)
    assert torch.equal(idx2, idx1)
    chosen = scores.gather(1, idx2)
    torch.testing.assert_close(w2, chosen / chosen.sum(-1, keepdim=True))

    # A bias that does not change the ranking changes nothing at all.
    router.expert_bias.fill_(3.0)
    w3, idx3 = router(x)
    router.expert_bias.zero_()
    w4, idx4 = router(x)
    assert torch.equal(idx3, idx4) and torch.equal(w3, w4)


def test_tokens_per_expert_counts_routed_pairs():
    N, D, E, K = 37, 8, 8, 3
    router = init_(Router(D, RouterConfig(E, K, "softmax")))
    _, idx = router(torch.randn(N, D))
    counts = router.last_tokens_per_expert
    assert counts.shape == (E,)
    assert counts.sum() == N * K
    assert torch.equal(counts.long(), torch.bincount(idx.flatten(), minlength=E))


def test_router_is_fp32_under_bf16_autocast():
    N, D, E, K = 64, 32, 16, 2
    x = torch.randn(N, D)
    router = init_(Router(D, RouterConfig(E, K, "softmax")), std=1.0)
    w_ref, idx_ref = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w, idx = router(x)
    assert w.dtype == torch.float32
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-6)


# -- auxiliary loss --------------------------------------------------------------------------------

def test_aux_loss_is_one_for_uniform_probabilities():
    N, D, E, K = 32, 8, 8, 2
    router = Router(D, RouterConfig(E, K, "softmax", aux_loss_coef=0.5))
    torch.nn.init.zeros_(router.weight)  # every expert gets probability 1/E
    router.train()
    router(torch.randn(N, D))
    torch.testing.assert_close(router.aux_loss, torch.tensor(0.5))
    # The same for any assignment of tokens, as long as the probabilities are uniform.
    for counts in (torch.tensor([16.0, 0, 0, 0, 0, 0, 0, 0]), torch.arange(8.0)):
        torch.testing.assert_close(load_balancing_loss(torch.full((N, E), 1 / E), counts), torch.tensor(1.0))


def test_aux_loss_grows_with_imbalance_and_matches_formula():
    N, E, K = 64, 8, 2
    favour = torch.zeros(E)
    favour[0] = 1.0
    noise = torch.randn(N, E) * 0.1
    losses = []
    for strength in (0.0, 1.0, 2.0, 4.0, 8.0):
        scores = (noise * (strength > 0) + strength * favour).softmax(-1)
        idx = scores.topk(K, dim=-1).indices
        counts = torch.bincount(idx.flatten(), minlength=E).float()
        loss = load_balancing_loss(scores, counts)
        f = counts / counts.sum()
        torch.testing.assert_close(loss, E * (f * scores.mean(0)).sum())
        losses.append(float(loss))
    assert losses[0] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] > 3.0


def test_aux_loss_only_in_training_and_has_router_gradient():
    D, E, K = 8, 4, 2
    router = init_(Router(D, RouterConfig(E, K, "sigmoid", aux_loss_coef=0.1)))
    x = torch.randn(10, D)
    router.eval()
    router(x)
    assert router.aux_loss is None
    router.train()
    router(x)
    assert router.aux_loss is not None and router.aux_loss.requires_grad
    router.aux_loss.backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    router.aux_loss_coef = 0.0
    router(x)
    assert router.aux_loss is None


# -- MoE block -------------------------------------------------------------------------------------

@pytest.mark.parametrize("router_kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("shared, gate", [(0, False), (1, False), (2, True)])
def test_moe_matches_reference_composition(router_kind, shared, gate):
    B, T, D, E, Fd, K = 2, 5, 16, 8, 8, 2
    moe = init_(MoE(MoEConfig(D, Fd, RouterConfig(E, K, router_kind, scaling=1.5), n_shared_experts=shared,
                              shared_ffn_dim=shared * Fd, shared_expert_gate=gate)))
    assert (moe.shared is not None) == (shared > 0) and (moe.shared_gate is not None) == gate
    x = torch.randn(B, T, D)
    y = moe(x)
    assert y.shape == (B, T, D)
    x_ND = x.reshape(-1, D)
    weights, idx = moe.router(x_ND)
    ref = moe.experts.forward_reference(x_ND, weights, idx)
    if shared:
        s = moe.shared(x_ND)
        ref = ref + (s * torch.sigmoid(moe.shared_gate(x_ND)) if gate else s)
    torch.testing.assert_close(y, ref.view(B, T, D), atol=1e-5, rtol=1e-5)


def test_moe_bf16_autocast_close_to_fp32():
    D, E, Fd, K = 32, 8, 32, 2
    moe = init_(MoE(MoEConfig(D, Fd, RouterConfig(E, K, "softmax"), n_shared_experts=1, shared_ffn_dim=Fd)), std=0.2)
    x = torch.randn(2, 16, D)
    ref = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    assert y.dtype == torch.bfloat16
    err = (y.float() - ref).norm() / ref.norm()
    assert err < 2e-2, err
    # The backward runs too, and the fp32 master weights get fp32 grads.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        moe(x).float().pow(2).mean().backward()
    assert moe.experts.gate_up.grad.dtype == torch.float32 and torch.isfinite(moe.experts.gate_up.grad).all()


def test_grouped_experts_bf16_weights_close_to_fp32():
    experts = init_(GroupedExperts(8, 32, 16), std=0.2)
    x = torch.randn(24, 32)
    weights, idx = random_routing(24, 8, 2)
    ref = experts.forward_reference(x, weights, idx)
    experts_bf16 = experts.to(torch.bfloat16)
    y = experts_bf16(x.bfloat16(), weights, idx)
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).norm() / ref.norm() < 2e-2


@pytest.mark.parametrize("multiple", [4, 64])
def test_bucketed_layout_pads_every_group_to_a_multiple(multiple):
    from deepseek.nn.grouped_mm import bucketed_layout

    E, N, K = 8, 50, 2
    _, idx = random_routing(N, E, K)
    flat = idx.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=E).to(torch.int32)
    offsets = counts.cumsum(0, dtype=torch.int32)
    rows, ends, total = bucketed_layout(flat[order], counts, offsets, multiple)
    assert total % multiple == 0 and int(ends[-1]) == total and total >= N * K
    starts = torch.cat([torch.zeros(1, dtype=torch.int32), ends[:-1]])
    assert ((ends - starts) % multiple == 0).all() and ((ends - starts) >= counts).all()
    assert rows.unique().numel() == N * K  # every pair its own row
    expert = flat[order]
    assert ((rows >= starts[expert]) & (rows < ends[expert])).all()  # ... inside its expert's padded group


def test_bf16_dispatch_with_padded_groups_matches_the_fp32_reference():
    """Under bf16 autocast on CPU the groups are padded (bounded kernel shapes for oneDNN): same values and grads."""
    experts = init_(GroupedExperts(8, 64, 32), std=0.2)
    x = torch.randn(100, 64)
    weights, idx = random_routing(100, 8, 2)
    grad_out = torch.randn(100, 64)
    ref_x = x.clone().requires_grad_(True)
    ref = experts.forward_reference(ref_x, weights, idx)
    (ref * grad_out).sum().backward()
    ref_grads = (ref_x.grad, experts.gate_up.grad.clone(), experts.down.grad.clone())
    experts.zero_grad(set_to_none=True)
    x_ = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts(x_, weights, idx)
    (y.float() * grad_out).sum().backward()
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert (y.float() - ref).norm() / ref.norm() < 2e-2
    for got, want in zip((x_.grad, experts.gate_up.grad, experts.down.grad), ref_grads):
        assert torch.isfinite(got).all() and (got.float() - want).norm() / want.norm() < 3e-2


# -- auxiliary-loss-free balancing -----------------------------------------------------------------

def sigmoid_model(**overrides) -> MoETransformer:
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, moe_ffn_dim=16,
                      n_routed_experts=8, top_k=2, router="sigmoid", max_seq_len=64, **overrides)
    return MoETransformer(cfg)


def test_update_router_biases_moves_toward_balance_and_resets_load():
    model = sigmoid_model(bias_update_speed=0.01)
    routers = model.routers()
    with torch.no_grad():  # a skewed router: expert 0 is everyone's first choice
        for r in routers:
            r.weight[0] += 0.5 * torch.sign(model.embed.weight.mean(0))
    model.train()
    ids = torch.randint(0, 64, (2, 16))
    model(ids)
    model(ids)
    loads = [r.load_accum.clone() for r in routers]
    for r, load in zip(routers, loads):
        assert load.sum() == 2 * 2 * 16 * 2  # two forwards of B*T tokens, K pairs each
        torch.testing.assert_close(load, 2 * r.last_tokens_per_expert)
    update_router_biases(model)
    for r, load in zip(routers, loads):
        expected = 0.01 * torch.sign(load.mean() - load)
        torch.testing.assert_close(r.expert_bias, expected)
        busiest, idlest = int(load.argmax()), int(load.argmin())
        assert r.expert_bias[busiest] < 0 < r.expert_bias[idlest]
        assert r.load_accum.sum() == 0
    # Nothing accumulated since: a second update changes nothing.
    before = [r.expert_bias.clone() for r in routers]
    update_router_biases(model, speed=1.0)
    assert all(torch.equal(r.expert_bias, b) for r, b in zip(routers, before))


def test_balancing_reduces_imbalance_over_steps():
    model = sigmoid_model()
    with torch.no_grad():
        for r in model.routers():
            r.weight.normal_(0.0, 0.5)
    model.train()
    ids = torch.randint(0, 64, (4, 32))
    with torch.no_grad():
        model(ids)
    start = model.router_stats().max_over_mean.max()
    for _ in range(30):
        with torch.no_grad():
            model(ids)
        update_router_biases(model, speed=0.05)
    with torch.no_grad():
        model(ids)
    assert model.router_stats().max_over_mean.max() < start


def test_eval_forward_does_not_accumulate_load_and_softmax_routers_are_untouched():
    model = sigmoid_model()
    model.eval()
    model(torch.randint(0, 64, (1, 8)))
    assert all(r.load_accum.sum() == 0 for r in model.routers())

    softmax = MoETransformer(ModelConfig(vocab_size=64, d_model=32, n_heads=2, n_kv_heads=1, moe_ffn_dim=16,
                                         router="softmax", max_seq_len=64)).train()
    softmax(torch.randint(0, 64, (1, 8)))
    update_router_biases(softmax, speed=1.0)
    for r in softmax.routers():
        assert r.expert_bias.abs().sum() == 0 and r.load_accum.sum() > 0
