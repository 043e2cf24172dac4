"""Attention: rotary embeddings, the GQA attention module against a naive softmax, causality."""

from __future__ import annotations

import math

import pytest
import torch

from deepseek.nn import Attention, AttentionInputs, KVCache, RMSNorm, RotaryEmbedding, apply_rotary


def naive_attention(q_BHTD, k_BHSD, v_BHSD, allowed_TS):
    """softmax(q k^T / sqrt(Dh) masked) v, with k/v heads repeated for grouped-query attention."""
    rep = q_BHTD.shape[1] // k_BHSD.shape[1]
    k = k_BHSD.repeat_interleave(rep, dim=1)
    v = v_BHSD.repeat_interleave(rep, dim=1)
    scores = q_BHTD @ k.transpose(-1, -2) / math.sqrt(q_BHTD.shape[-1])
    scores = scores.masked_fill(~allowed_TS, float("-inf"))
    return scores.softmax(dim=-1) @ v


def causal(T: int) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool).tril()


# -- rotary embeddings -----------------------------------------------------------------------------

def test_rope_preserves_norms_and_position_zero_is_identity():
    Dh, T = 16, 40
    rope = RotaryEmbedding(Dh, max_seq_len=64)
    positions = torch.arange(T).expand(2, T)
    cos, sin = rope(positions)
    assert cos.shape == sin.shape == (2, T, Dh)
    x = torch.randn(2, 3, T, Dh)
    y = apply_rotary(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    # Each (i, i + Dh/2) pair is rotated as a 2-D vector, so its norm is kept too.
    pair_norm = lambda t: t[..., : Dh // 2] ** 2 + t[..., Dh // 2:] ** 2  # noqa: E731
    torch.testing.assert_close(pair_norm(y), pair_norm(x))
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])
    assert not torch.allclose(y[:, :, 1:], x[:, :, 1:])


def test_rope_scores_depend_only_on_relative_position():
    Dh = 8
    rope = RotaryEmbedding(Dh, max_seq_len=128)
    q, k = torch.randn(1, 1, 1, Dh), torch.randn(1, 1, 1, Dh)

    def score(m, n):
        cq, sq = rope(torch.tensor([[m]]))
        ck, sk = rope(torch.tensor([[n]]))
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    torch.testing.assert_close(score(5, 2), score(103, 100), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(score(7, 7), (q * k).sum(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_rope_matches_explicit_rotation():
    Dh, theta = 4, 10000.0
    rope = RotaryEmbedding(Dh, max_seq_len=16, theta=theta)
    x = torch.randn(1, 1, 1, Dh)
    pos = 3
    cos, sin = rope(torch.tensor([[pos]]))
    y = apply_rotary(x, cos, sin)[0, 0, 0]
    x = x[0, 0, 0]
    for i in range(Dh // 2):
        angle = pos / theta ** (2 * i / Dh)
        a, b = x[i], x[i + Dh // 2]
        expected = torch.stack([a * math.cos(angle) - b * math.sin(angle), a * math.sin(angle) + b * math.cos(angle)])
        torch.testing.assert_close(torch.stack([y[i], y[i + Dh // 2]]), expected, atol=1e-6, rtol=1e-5)


def test_rope_tables_stay_fp32_when_model_is_cast():
    rope = RotaryEmbedding(8, max_seq_len=32)
    rope.to(torch.bfloat16)
    assert rope.cos_table.dtype == torch.float32


# -- the attention module --------------------------------------------------------------------------

def make_attention(n_heads=4, n_kv_heads=2, head_dim=8, d_model=32, **kwargs) -> Attention:
    attn = Attention(d_model, n_heads, n_kv_heads, head_dim, **kwargs)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.3)
    return attn


def reference_attention(attn: Attention, x_BTD, allowed_TS):
    """The attention module written out by hand with the naive softmax."""
    B, T, _ = x_BTD.shape
    H, Hkv, Dh = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.q(x_BTD).view(B, T, H, Dh)
    k = attn.k(x_BTD).view(B, T, Hkv, Dh)
    v = attn.v(x_BTD).view(B, T, Hkv, Dh).transpose(1, 2)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = RotaryEmbedding(Dh, 256)(torch.arange(T).expand(B, T))
    q, k = apply_rotary(q.transpose(1, 2), cos, sin), apply_rotary(k.transpose(1, 2), cos, sin)
    out = naive_attention(q, k, v, allowed_TS)
    return attn.o(out.transpose(1, 2).reshape(B, T, H * Dh))


def inputs_for(T: int, B: int, head_dim: int, **kwargs) -> AttentionInputs:
    cos, sin = RotaryEmbedding(head_dim, 256)(torch.arange(T).expand(B, T))
    return AttentionInputs(cos, sin, **kwargs)


@pytest.mark.parametrize("n_heads, n_kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("bias, qk_norm", [(False, False), (True, True)])
def test_dense_causal_attention_matches_naive(n_heads, n_kv_heads, bias, qk_norm):
    B, T = 2, 11
    attn = make_attention(n_heads, n_kv_heads, bias=bias, qk_norm=qk_norm)
    assert isinstance(attn.q_norm, RMSNorm) == qk_norm and (attn.q.bias is not None) == bias
    x = torch.randn(B, T, 32)
    out = attn(x, inputs_for(T, B, 8, is_causal=True), layer=0)
    torch.testing.assert_close(out, reference_attention(attn, x, causal(T)), atol=1e-5, rtol=1e-5)
    # An explicit boolean mask gives the same as is_causal.
    masked = attn(x, inputs_for(T, B, 8, mask=causal(T).expand(B, 1, T, T)), layer=0)
    torch.testing.assert_close(masked, out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window, n_global", [(4, 0), (4, 2), (16, 1)])
def test_sparse_attention_module_matches_naive(window, n_global):
    B, T = 2, 13
    attn = make_attention()
    x = torch.randn(B, T, 32)
    out = attn(x, inputs_for(T, B, 8, blocked_sparse=True, window=window, n_global=n_global), layer=0)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i) & ((i - j < window) | (j < n_global))
    torch.testing.assert_close(out, reference_attention(attn, x, allowed), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sparse", [False, True])
def test_attention_is_causal(sparse):
    B, T, t = 1, 12, 7
    attn = make_attention()
    kwargs = dict(blocked_sparse=True, window=4, n_global=2) if sparse else dict(is_causal=True)
    x = torch.randn(B, T, 32)
    out = attn(x, inputs_for(T, B, 8, **kwargs), layer=0)
    x2 = x.clone()
    x2[:, t] += torch.randn(32)
    out2 = attn(x2, inputs_for(T, B, 8, **kwargs), layer=0)
    torch.testing.assert_close(out2[:, :t], out[:, :t], atol=0, rtol=0)
    assert not torch.allclose(out2[:, t], out[:, t])


def test_attention_with_cache_equals_full_attention():
    B, T, split = 2, 10, 6
    attn = make_attention()
    x = torch.randn(B, T, 32)
    full = attn(x, inputs_for(T, B, 8, is_causal=True), layer=0)
    cache = KVCache(n_layers=1, batch_size=B, max_len=16, n_kv_heads=2, head_dim=8)
    cos, sin = RotaryEmbedding(8, 256)(cache.reserve(None, split))
    first = attn(x[:, :split], AttentionInputs(cos, sin, is_causal=True, cache=cache), layer=0)
    cache.advance(split)
    outs = [first]
    for step in range(split, T):
        cos, sin = RotaryEmbedding(8, 256)(cache.reserve(None, 1))
        outs.append(attn(x[:, step:step + 1], AttentionInputs(cos, sin, cache=cache), layer=0))
        cache.advance(1)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)
