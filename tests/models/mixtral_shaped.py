"""A tiny Mixtral-shaped model shared by the adapter tests (D=64 != F=32, so gate_up and down adapters cannot be
confused); softmax router, no shared expert, so the Hugging Face export and PEFT's names apply."""

import torch

import deepseek as ds

VOCAB = 300


def base_model(seed: int = 0, max_seq_len: int = 64) -> ds.MoETransformer:
    torch.manual_seed(seed)
    config = ds.ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=max_seq_len,
                            rope_theta=10000.0, moe_ffn_dim=32, n_routed_experts=4, top_k=2, router="softmax")
    model = ds.MoETransformer(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.15 * torch.randn_like(p))
    return model
