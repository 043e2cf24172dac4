"""The grouped expert matmul traces under torch.compile in fp32 (custom op) with eager's values and grads."""

from __future__ import annotations

import warnings

import torch

from deepseek.nn import GroupedExperts


def test_compiled_grouped_experts_fp32_match_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    experts = GroupedExperts(8, 16, 32)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(24, 16)
    weights = torch.rand(24, 2) + 0.1
    idx = torch.rand(24, 8).argsort(dim=-1)[:, :2]
    grads = []
    for fn in (experts.forward, torch.compile(experts.forward, backend="aot_eager", fullgraph=True)):
        experts.zero_grad(set_to_none=True)
        x_ = x.clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no silent fallback
            y = fn(x_, weights, idx)
        y.square().sum().backward()
        grads.append((y.detach(), x_.grad, experts.gate_up.grad, experts.down.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def test_grouped_mm_custom_ops_pass_opcheck_with_transposed_weights():
    # Experts pass their (out, in) weights as transposed views; fake kernels must report real strides.
    from deepseek.nn.grouped_mm import _grouped_mm_backward_op, _grouped_mm_op

    x = torch.randn(10, 8)
    w = torch.randn(3, 16, 8).transpose(1, 2)  # [E, I, O] view of [E, O, I]
    offsets = torch.tensor([4, 4, 10], dtype=torch.int32)
    torch.library.opcheck(_grouped_mm_op, (x, w, offsets))
    torch.library.opcheck(_grouped_mm_backward_op, (torch.randn(10, 16), x, w, offsets))


def test_compiled_decoding_expert_path_matches_reference():
    # Under compile, a handful of tokens take the gathered path; it must equal the per-expert reference.
    from deepseek.nn.experts import GroupedExperts

    torch.manual_seed(0)
    experts = GroupedExperts(8, 16, 12)
    torch.nn.init.normal_(experts.gate_up, std=0.1)
    torch.nn.init.normal_(experts.down, std=0.1)
    x = torch.randn(3, 16)
    weights = torch.rand(3, 2)
    choice = torch.tensor([[0, 5], [5, 7], [2, 0]])
    with torch.no_grad():
        compiled = torch.compile(experts.forward, backend="aot_eager", fullgraph=True)(x, weights, choice)
        torch.testing.assert_close(compiled, experts.forward_reference(x, weights, choice), rtol=1e-5, atol=1e-6)
