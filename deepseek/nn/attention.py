"""Grouped-query attention (Ainslie et al., 2023) with rotary embeddings, via F.scaled_dot_product_attention.

Legend: B batch, T new tokens, S keys (cache + new), H query heads, Hkv key/value heads, Dh head dim.
SDPA picks the flash / memory-efficient kernels where the hardware has them (the CPU flash kernel
included), so the dense causal path never materialises a [T, T] score matrix.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from deepseek.nn.kv_cache import AttentionCache
from deepseek.nn.norm import RMSNorm
from deepseek.nn.rope import apply_rotary
from deepseek.nn.sparse_attention import blocked_local_global_attention, dense_local_global_attention


@dataclass
class AttentionInputs:
    """What every layer needs to attend, computed once per model forward.

    ``mask`` ([B, 1, T, S] bool) is None when ``is_causal`` or ``blocked_sparse`` covers the pattern.
    """

    cos: torch.Tensor  # [B, 1, T, Dh]
    sin: torch.Tensor
    mask: Optional[torch.Tensor] = None
    is_causal: bool = False
    blocked_sparse: bool = False
    window: int = 0
    n_global: int = 0
    cache: Optional[AttentionCache] = None

    def __post_init__(self) -> None:
        if self.cos.dim() == 3:  # [B, T, Dh] -> [B, 1, T, Dh], broadcast over heads
            self.cos, self.sin = self.cos.unsqueeze(1), self.sin.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head attention with ``n_kv_heads`` shared key/value heads."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, bias: bool = False,
                 qk_norm: bool = False, norm_eps: float = 1e-5):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.k = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.v = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.o = nn.Linear(n_heads * head_dim, d_model, bias=False)
        self.q_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        # Quantization replaces q, k and v by one product (deepseek.nn.quantized): one activation pass, not three.
        self.qkv: Optional[nn.Module] = None

    def project_qkv(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv is not None:
            kv_width = self.n_kv_heads * self.head_dim
            return self.qkv(x_BTD).split([self.n_heads * self.head_dim, kv_width, kv_width], dim=-1)
        return self.q(x_BTD), self.k(x_BTD), self.v(x_BTD)

    def forward(self, x_BTD: torch.Tensor, inputs: AttentionInputs, layer: int) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q, k, v = self.project_qkv(x_BTD)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # Under CPU autocast, rope and attention run in fp32: torch's CPU flash-attention kernel is slower
        # in bf16 than in fp32 at small head dims (forward+backward 1.3x slower at head_dim 32, equal at
        # 128; docs/benchmarks.md), and upcasting q, k, v costs little next to attention itself.
        fp32_attention = x_BTD.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        if fp32_attention:
            q, k, v = q.float(), k.float(), v.float()
        q = apply_rotary(q.transpose(1, 2), inputs.cos, inputs.sin)
        k = apply_rotary(k.transpose(1, 2), inputs.cos, inputs.sin)
        gqa = self.n_kv_heads != self.n_heads

        with torch.autocast("cpu", enabled=False) if fp32_attention else contextlib.nullcontext():
            if inputs.blocked_sparse:
                # Long prefill or training with the sparse pattern: attend among the new tokens only.
                if torch.compiler.is_exporting():
                    # The blocked kernel branches on T in Python: its graph would hold for one side of T <= window.
                    out = dense_local_global_attention(q, k, v, inputs.window, inputs.n_global)
                else:
                    out = blocked_local_global_attention(q, k, v, inputs.window, inputs.n_global)
                if inputs.cache is not None:
                    inputs.cache.write(layer, k.to(inputs.cache.k.dtype), v.to(inputs.cache.v.dtype))
            else:
                if inputs.cache is not None:
                    k, v = inputs.cache.write(layer, k.to(inputs.cache.k.dtype), v.to(inputs.cache.v.dtype))
                    k, v = k.to(q.dtype), v.to(q.dtype)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=inputs.mask, is_causal=inputs.is_causal,
                                                     enable_gqa=gqa)
        return self.o(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
