"""The Hugging Face anchors: Mixtral built from our config, carrying our exact weights.

Kept inside benchmarks/ (rather than using deepseek.models.hf) so the benchmarks pin down precisely
which HF modules and which experts implementation they compare against.

Layouts: ours ``experts.gate_up`` [E, 2F, D] (gate rows first) and ``experts.down`` [E, D, F], the same
as HF's ``experts.gate_up_proj`` (``chunk(2)``) and ``experts.down_proj``.
Rotary embeddings use the same "rotate half" layout, so q/k need no permutation.
"""

from __future__ import annotations

import torch

from deepseek.models.config import ModelConfig

EXPERTS_IMPLEMENTATION = "grouped_mm"  # what transformers picks by default for Mixtral on torch >= 2.9


def mixtral_config(cfg: ModelConfig, n_experts: int | None = None):
    from transformers import MixtralConfig

    if cfg.n_shared_experts or cfg.first_k_dense or cfg.router != "softmax" or cfg.tie_embeddings:
        raise ValueError("only Mixtral-shaped configs have an HF Mixtral twin")
    hf = MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.moe_ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        num_local_experts=n_experts or cfg.n_routed_experts, num_experts_per_tok=cfg.top_k,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=False, output_router_logits=False, router_jitter_noise=0.0,
    )
    hf._experts_implementation = EXPERTS_IMPLEMENTATION  # a standalone block does not get it from from_pretrained
    return hf


@torch.no_grad()
def copy_moe_into_hf(ours, hf_block) -> None:
    """Our ``deepseek.nn.MoE`` (softmax router, no shared expert) -> HF ``MixtralSparseMoeBlock``."""
    hf_block.gate.weight.copy_(ours.router.weight)
    hf_block.experts.gate_up_proj.copy_(ours.experts.gate_up)
    hf_block.experts.down_proj.copy_(ours.experts.down)


def hf_moe_block(ours_moe, cfg: ModelConfig, n_experts: int):
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    block = MixtralSparseMoeBlock(mixtral_config(cfg, n_experts))
    copy_moe_into_hf(ours_moe, block)
    return block


@torch.no_grad()
def hf_mixtral_from_ours(model):
    """``transformers.MixtralForCausalLM`` with the same config and the same weights as ``model``."""
    from transformers import MixtralForCausalLM

    cfg = model.config
    hf = MixtralForCausalLM(mixtral_config(cfg))
    hf.model.embed_tokens.weight.copy_(model.embed.weight)
    for ours, theirs in zip(model.blocks, hf.model.layers):
        theirs.input_layernorm.weight.copy_(ours.attn_norm.weight)
        theirs.post_attention_layernorm.weight.copy_(ours.ffn_norm.weight)
        for name in ("q", "k", "v", "o"):
            getattr(theirs.self_attn, f"{name}_proj").weight.copy_(getattr(ours.attn, name).weight)
        copy_moe_into_hf(ours.ffn, theirs.mlp)
    hf.model.norm.weight.copy_(model.norm.weight)
    hf.lm_head.weight.copy_(model.lm_head.weight)
    return hf
