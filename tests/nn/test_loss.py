"""Chunked linear cross-entropy == F.cross_entropy of the materialised logits (loss and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepseek.models import MoETransformer, preset
from deepseek.nn import linear_cross_entropy


def reference(x, w, t):
    return F.cross_entropy(F.linear(x, w).float(), t)


@pytest.mark.parametrize("ignored", ["none", "every 5th", "all but 3"])  # full rows, then the counted rows only
@pytest.mark.parametrize("chunk", [None, 7, 64])
def test_matches_cross_entropy_fp32(chunk, ignored):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 16, generator=g, requires_grad=True)
    w = torch.randn(40, 16, generator=g).requires_grad_()
    t = torch.randint(0, 40, (50,), generator=g)
    # Ignored positions count neither in the loss nor in the mean, and get a zero gradient.
    if ignored == "every 5th":
        t[::5] = -100
    elif ignored == "all but 3":
        t[torch.ones(50, dtype=torch.bool).index_fill_(0, torch.tensor([4, 17, 40]), False)] = -100
    ref = reference(x, w, t)
    gx_ref, gw_ref = torch.autograd.grad(ref, (x, w))
    out = linear_cross_entropy(x, w, t, chunk_size=chunk)
    gx, gw = torch.autograd.grad(out, (x, w))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw, gw_ref, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_close_and_no_grad_path():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 32, generator=g, requires_grad=True)
    w = torch.randn(100, 32, generator=g).requires_grad_()
    t = torch.randint(0, 100, (64,), generator=g)
    with torch.autocast("cpu", torch.bfloat16):
        ref = reference(x, w, t)
        out = linear_cross_entropy(x, w, t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x, w, t), reference(x, w, t), atol=1e-5, rtol=1e-5)


def test_model_targets_path_equals_logits_path():
    torch.manual_seed(0)
    model = MoETransformer(preset("tiny")).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    ref = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    out = model(ids, targets=targets)
    grads = torch.autograd.grad(out, list(model.parameters()))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_frozen_head_gets_no_gradient_and_the_same_input_gradient():
    # LoRA freezes the head: its [V, D] gradient (a third of the head's FLOPs) is not computed, x's is unchanged.
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 16, generator=g, requires_grad=True)
    w = torch.randn(40, 16, generator=g)
    t = torch.randint(0, 40, (50,), generator=g)
    t[::7] = -100
    (gx_ref,) = torch.autograd.grad(reference(x, w, t), (x,))
    out = linear_cross_entropy(x, w, t, chunk_size=16)
    out.backward()
    torch.testing.assert_close(x.grad, gx_ref, atol=1e-6, rtol=1e-5)
    assert w.grad is None
    # ... and a frozen input with a trainable head: only the head's gradient
    x2, w2 = x.detach(), w.clone().requires_grad_()
    (gw_ref,) = torch.autograd.grad(reference(x2, w2, t), (w2,))
    (gw,) = torch.autograd.grad(linear_cross_entropy(x2, w2, t, chunk_size=16), (w2,))
    torch.testing.assert_close(gw, gw_ref, atol=1e-6, rtol=1e-5)
