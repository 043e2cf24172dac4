"""What a model costs per token: active parameters, FLOPs per trained token, bytes read per decoded token.

The conventions are docs/benchmarks.md's (``benchmarks/bench_train.py``): N_active counts every parameter but the
input embedding, routed experts at top_k / E, and the head (for a tied model the head *is* the embedding matrix, so
its V x D is added back). Training FLOPs per token = 6 · N_active (forward 2, backward 4 per weight) plus the
attention products torchtitan and nanoGPT add, 12 · L · H · Dh · T (QKᵀ and PV, forward and backward, at sequence
length T; the causal half is not subtracted, as theirs).
"""

from __future__ import annotations

import torch

from deepseek.models.transformer import MoETransformer


def n_active_params(model: MoETransformer) -> int:
    """Parameters a token passes through in a training step, as ``bench_train.py`` counts them."""
    n = model.num_parameters(active=True, embedding=False)
    if model.config.tie_embeddings:
        n += model.embed.weight.numel()
    return n


def attention_flops_per_token(model: MoETransformer, seq_len: int, passes: int = 3) -> int:
    """QKᵀ and PV FLOPs per token at ``seq_len``: 4 · L · H · Dh · T per forward; ``passes`` 3 = forward + backward
    (torchtitan's 12 · L · H · Dh · T), 1 = forward only."""
    cfg = model.config
    return 4 * passes * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def train_flops_per_token(model: MoETransformer, seq_len: int) -> dict[str, int]:
    """``{"dense": 6·N_active, "attention": 12·L·H·Dh·T, "total": both}`` for one trained token."""
    dense = 6 * n_active_params(model)
    attention = attention_flops_per_token(model, seq_len)
    return {"dense": dense, "attention": attention, "total": dense + attention}


def kv_cache_bytes_per_token(model: MoETransformer, dtype: torch.dtype | None = None) -> int:
    """Bytes the KV cache holds per token of one sequence: K and V of every layer, n_kv_heads x head_dim each."""
    cfg = model.config
    dtype = dtype or next(model.parameters()).dtype
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (gpt-fast's model size)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def decode_weight_bytes(model: MoETransformer, batch: int) -> float:
    """Bytes of weights one decoding step reads for ``batch`` sequences: everything but the input embedding (only
    ``batch`` rows of it are read; a tied head reads it whole), the routed experts at the share a batch touches
    under even routing, ``1 - (1 - k/E)^batch`` (k/E for one sequence, nearly all experts for a large batch)."""
    cfg = model.config
    expert, embedding, other = 0, 0, 0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if name.endswith("experts.gate_up") or name.endswith("experts.down"):
            expert += size
        elif name == "embed.weight":
            embedding += size
        else:
            other += size
    touched = 1.0 - (1.0 - cfg.top_k / cfg.n_routed_experts) ** batch
    read_embedding = embedding if cfg.tie_embeddings else embedding * min(1.0, batch / cfg.vocab_size)
    return other + expert * touched + read_embedding
