"""Sliding-window + global-token causal attention with memory linear in sequence length.

Query ``q`` may attend key ``k`` when ``k <= q`` and either ``q - k < window`` (local) or
``k < n_global`` (the first tokens, visible to everyone: "attention sinks"). The dense reference
builds that [T, T] mask; the blocked kernel cuts the sequence into blocks of ``window`` queries, each
of which only needs its own block, the previous block and the global tokens: O(T * window) memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def local_global_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, n_global: int) -> torch.Tensor:
    """Boolean mask [..., Tq, Tk]: True where a query at ``q_pos`` may see a key at ``k_pos``."""
    q = q_pos.unsqueeze(-1)
    k = k_pos.unsqueeze(-2)
    return (k <= q) & ((q - k < window) | (k < n_global))


def dense_local_global_attention(q_BHTD, k_BHTD, v_BHTD, window: int, n_global: int) -> torch.Tensor:
    """Reference: dense attention under the full [T, T] local+global mask. O(T^2) memory."""
    pos = torch.arange(q_BHTD.shape[2], device=q_BHTD.device)
    mask = local_global_mask(pos, pos, window, n_global)
    return F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTD, attn_mask=mask,
                                          enable_gqa=k_BHTD.shape[1] != q_BHTD.shape[1])


def blocked_local_global_attention(q_BHTD, k_BHTD, v_BHTD, window: int, n_global: int) -> torch.Tensor:
    """Same result as :func:`dense_local_global_attention`, in O(T * (2 * window + n_global)) memory.

    q: [B, H, T, Dh]; k, v: [B, Hkv, T, Dh] (grouped-query: H a multiple of Hkv). Returns [B, H, T, Dh].
    """
    B, H, T, Dh = q_BHTD.shape
    if T <= window:  # every causal key is inside the window
        return F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTD, is_causal=True,
                                              enable_gqa=k_BHTD.shape[1] != H)
    W, G = window, min(n_global, T)
    n_blocks = -(-T // W)
    pad = n_blocks * W - T
    q = F.pad(q_BHTD, (0, 0, 0, pad))
    # One block of zeros in front, so block b's keys are the slice [b*W, b*W + 2W) of the padded keys.
    k = F.pad(k_BHTD, (0, 0, W, pad))
    v = F.pad(v_BHTD, (0, 0, W, pad))

    def windows(x):  # [B, Hkv, (n+1)W, Dh] -> [B, n, Hkv, 2W, Dh]
        return x.unfold(2, 2 * W, W).permute(0, 2, 1, 4, 3)

    def globals_(x):  # the first G real tokens, repeated for every block: [B, n, Hkv, G, Dh]
        return x[:, :, W:W + G].unsqueeze(1).expand(-1, n_blocks, -1, -1, -1)

    k_blocks = torch.cat([globals_(k), windows(k)], dim=3)
    v_blocks = torch.cat([globals_(v), windows(v)], dim=3)
    q_blocks = q.view(B, H, n_blocks, W, Dh).transpose(1, 2)  # [B, n, H, W, Dh]

    device = q_BHTD.device
    block_start = torch.arange(n_blocks, device=device).view(-1, 1, 1) * W
    q_pos = block_start + torch.arange(W, device=device).view(1, -1, 1)  # [n, W, 1]
    win_pos = block_start - W + torch.arange(2 * W, device=device).view(1, 1, -1)  # [n, 1, 2W]
    glob_pos = torch.arange(G, device=device).view(1, 1, -1)  # [1, 1, G]
    # A global key already inside the block's window slots is counted there, not twice.
    glob_ok = (glob_pos <= q_pos) & (glob_pos < block_start - W)
    win_ok = (win_pos >= 0) & (win_pos <= q_pos) & ((q_pos - win_pos < W) | (win_pos < G))
    mask = torch.cat([glob_ok.expand(-1, W, -1), win_ok], dim=2).unsqueeze(1)  # [n, 1, W, G + 2W]

    # Blocks become the batch axis: SDPA's fused kernels (the CPU flash kernel included) take 4-D inputs
    # only; given the 5-D blocks it falls back to the math path, which materialises every block's scores.
    Hkv, S = k_blocks.shape[2], k_blocks.shape[3]
    out = F.scaled_dot_product_attention(
        q_blocks.reshape(B * n_blocks, H, W, Dh), k_blocks.reshape(B * n_blocks, Hkv, S, Dh),
        v_blocks.reshape(B * n_blocks, Hkv, S, Dh),
        attn_mask=mask.expand(B, -1, -1, -1, -1).reshape(B * n_blocks, 1, W, S), enable_gqa=Hkv != H)
    return out.view(B, n_blocks, H, W, Dh).transpose(1, 2).reshape(B, H, n_blocks * W, Dh)[:, :, :T]
