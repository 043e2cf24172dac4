"""The fused-product SwiGLU activation (its gradient formed in place) == autograd through silu(gate) * up."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepseek.nn.mlp import swiglu_of_fused


def reference(gate_up, ffn_dim):
    return F.silu(gate_up[:, :ffn_dim]) * gate_up[:, ffn_dim:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_and_gradient_equal_autograd(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 20, generator=g).to(dtype).requires_grad_()
    w = torch.randn(20, 20, generator=g).to(dtype)
    grad = torch.randn(37, 10, generator=g).to(dtype)
    out = swiglu_of_fused(x @ w, 10)  # an intermediate product: the in-place backward
    (gx,) = torch.autograd.grad(out, x, grad)
    ref = reference(x @ w, 10)
    (gx_ref,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=0)


def test_a_users_tensor_is_never_written():
    leaf = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    before = leaf.detach().clone()
    for x in (leaf, leaf.view(6, 8)):  # the leaf itself, and a view of it (which has a grad_fn)
        out = swiglu_of_fused(x, 4)
        (gx,) = torch.autograd.grad(out, leaf, torch.ones_like(out))
        (gx_ref,) = torch.autograd.grad(reference(leaf, 4), leaf, torch.ones_like(out))
        torch.testing.assert_close(gx, gx_ref)
        torch.testing.assert_close(leaf.detach(), before, rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda t: swiglu_of_fused(t, 3), (torch.randn(4, 6, dtype=torch.float64,
                                                                                    requires_grad=True),))


def test_second_backward_through_the_graph_is_refused_not_wrong():
    x = torch.randn(4, 6, requires_grad=True)
    loss = swiglu_of_fused(x * 2.0, 3).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_no_grad_and_3d_inputs_take_the_plain_path():
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(swiglu_of_fused(x, 4), F.silu(x[..., :4]) * x[..., 4:])
