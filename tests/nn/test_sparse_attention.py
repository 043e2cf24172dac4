"""Sliding-window + global-token attention: blocked kernel == dense masked reference == naive softmax."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepseek.models import ModelConfig, MoETransformer
from deepseek.nn import blocked_local_global_attention, dense_local_global_attention, local_global_mask


def explicit_mask(T: int, window: int, n_global: int) -> torch.Tensor:
    """The pattern, spelled out one (query, key) pair at a time."""
    allowed = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(i + 1):
            allowed[i, j] = (i - j < window) or (j < n_global)
    return allowed


def naive_attention(q, k, v, allowed):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~allowed, float("-inf"))
    return scores.softmax(dim=-1) @ v


def qkv(B, H, Hkv, T, Dh, requires_grad=False):
    make = lambda h: torch.randn(B, h, T, Dh, requires_grad=requires_grad)  # noqa: E731
    return make(H), make(Hkv), make(Hkv)


@pytest.mark.parametrize("T, window, n_global", [(20, 8, 3), (5, 8, 2)])
def test_local_global_mask_matches_explicit(T, window, n_global):
    pos = torch.arange(T)
    assert torch.equal(local_global_mask(pos, pos, window, n_global), explicit_mask(T, window, n_global))


CASES = [
    # T, window, n_global, H, Hkv
    (13, 4, 0, 2, 2),    # T not a multiple of the window, no globals
    (13, 4, 2, 2, 2),    # ... with global tokens
    (16, 4, 3, 4, 2),    # T a multiple of the window, GQA
    (17, 5, 7, 4, 1),    # more globals than the window, multi-query
    (8, 8, 2, 2, 2),     # T == window
    (5, 8, 2, 4, 2),     # T < window
    (9, 1, 0, 2, 1),     # window 1: every token sees itself only
    (9, 1, 2, 2, 1),     # window 1 plus sinks
    (6, 2, 10, 2, 2),    # more globals than tokens: plain causal
    (1, 4, 2, 2, 2),     # a single token
]


@pytest.mark.parametrize("T, window, n_global, H, Hkv", CASES)
def test_blocked_equals_dense_equals_naive(T, window, n_global, H, Hkv):
    q, k, v = qkv(2, H, Hkv, T, 8)
    blocked = blocked_local_global_attention(q, k, v, window, n_global)
    dense = dense_local_global_attention(q, k, v, window, n_global)
    naive = naive_attention(q, k, v, explicit_mask(T, window, n_global))
    assert blocked.shape == (2, H, T, 8)
    torch.testing.assert_close(blocked, naive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense, naive, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T, window, n_global, H, Hkv", [(13, 4, 2, 4, 2), (6, 8, 1, 2, 2)])
def test_blocked_gradients_equal_naive(T, window, n_global, H, Hkv):
    grads = []
    for fn in (lambda q, k, v: blocked_local_global_attention(q, k, v, window, n_global),
               lambda q, k, v: naive_attention(q, k, v, explicit_mask(T, window, n_global))):
        torch.manual_seed(0)
        q, k, v = qkv(1, H, Hkv, T, 8, requires_grad=True)
        (fn(q, k, v) * torch.linspace(-1, 1, 8)).sum().backward()
        grads.append((q.grad, k.grad, v.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_window_at_least_T_is_plain_causal():
    q, k, v = qkv(1, 2, 2, 7, 8)
    out = blocked_local_global_attention(q, k, v, window=7, n_global=0)
    torch.testing.assert_close(out, naive_attention(q, k, v, torch.ones(7, 7, dtype=torch.bool).tril()),
                               atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(T=st.integers(1, 24), window=st.integers(1, 9), n_global=st.integers(0, 6), Hkv=st.integers(1, 2),
       rep=st.integers(1, 2))
def test_blocked_equals_naive_property(T, window, n_global, Hkv, rep):
    q, k, v = qkv(1, Hkv * rep, Hkv, T, 4)
    torch.testing.assert_close(blocked_local_global_attention(q, k, v, window, n_global),
                               naive_attention(q, k, v, explicit_mask(T, window, n_global)), atol=1e-5, rtol=1e-5)


# -- a sparse model -----------------------------------------------------------------------------

def sparse_model(**overrides) -> MoETransformer:
    cfg = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, moe_ffn_dim=16, max_seq_len=64,
               attention="sparse", window=4, n_global_tokens=2)
    return MoETransformer(ModelConfig(**{**cfg, **overrides})).eval()


def test_sparse_model_is_causal():
    model = sparse_model()
    ids = torch.randint(0, 64, (2, 19))
    with torch.no_grad():
        logits = model(ids)
        for t in (2, 9, 18):
            changed = ids.clone()
            changed[:, t] = (changed[:, t] + 1) % 64
            out = model(changed)
            torch.testing.assert_close(out[:, :t], logits[:, :t], atol=1e-6, rtol=1e-5)
            assert not torch.allclose(out[:, t], logits[:, t])


def test_sparse_model_ignores_tokens_outside_window_and_sinks():
    # One layer: a query sees only its window and the sinks, so an out-of-window token cannot matter.
    model = sparse_model(n_layers=1)
    ids = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        logits = model(ids)
        changed = ids.clone()
        changed[:, 5] = (changed[:, 5] + 1) % 64  # not a sink (n_global=2); outside the window of t >= 9
        out = model(changed)
    torch.testing.assert_close(out[:, 9:], logits[:, 9:], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out[:, 5:9], logits[:, 5:9])
    with torch.no_grad():
        sink = ids.clone()
        sink[:, 1] = (sink[:, 1] + 1) % 64  # a sink: everyone sees it
        out = model(sink)
    assert not torch.allclose(out[:, 15], logits[:, 15])


def test_sparse_model_with_window_beyond_length_equals_dense_model():
    dense = sparse_model(attention="dense")
    sparse = sparse_model(window=64)
    sparse.load_state_dict(dense.state_dict())
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids), dense(ids), atol=1e-5, rtol=1e-5)
