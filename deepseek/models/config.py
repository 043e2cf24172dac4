"""The model config: architecture and vocabulary size, nothing about training or serving."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

from deepseek.config import ConfigError, from_dict


@dataclass
class ModelConfig:
    """A decoder-only MoE transformer in the DeepSeek / Mixtral family.

    Defaults are the ``tiny`` preset: it builds and runs on a laptop CPU in milliseconds.
    """

    vocab_size: int = 259
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: Optional[int] = None  # default d_model // n_heads
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    attention_bias: bool = False  # Qwen2-MoE puts biases on q/k/v
    qk_norm: bool = False  # Qwen3-MoE normalises q and k per head
    # Attention kind: dense causal, or sliding window of `window` tokens plus the first `n_global_tokens`.
    attention: Literal["dense", "sparse"] = "dense"
    window: int = 256
    n_global_tokens: int = 4
    # Feed-forward: `first_k_dense` dense SwiGLU layers, then MoE layers.
    first_k_dense: int = 0
    ffn_dim: int = 256  # width of the dense layers
    moe_ffn_dim: int = 128  # width of one expert
    n_routed_experts: int = 8
    n_shared_experts: int = 0
    shared_ffn_dim: Optional[int] = None  # default n_shared_experts * moe_ffn_dim
    shared_expert_gate: bool = False  # Qwen2-MoE scales the shared expert by sigmoid(gate(x))
    top_k: int = 2
    # Router kind: softmax-then-top-k (Mixtral) or sigmoid scores + balancing bias (DeepSeek-V3).
    router: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk_prob: bool = True  # renormalise the k selected weights to sum to 1
    routed_scaling_factor: float = 1.0
    aux_loss_coef: float = 0.0  # Switch-style load-balancing loss weight (0 = off)
    bias_update_speed: float = 1e-3  # step of the aux-loss-free balancing bias (sigmoid router)
    tie_embeddings: bool = False
    dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        problems = []
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                problems.append(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
            else:
                self.head_dim = self.d_model // self.n_heads
        if self.head_dim is not None and self.head_dim % 2:
            problems.append(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if not 1 <= self.top_k <= 8:
            problems.append(f"top_k must be 1..8, got {self.top_k}")
        if self.n_layers > self.first_k_dense and self.top_k > self.n_routed_experts:
            problems.append(f"top_k ({self.top_k}) exceeds n_routed_experts ({self.n_routed_experts})")
        if not 0 <= self.first_k_dense <= self.n_layers:
            problems.append(f"first_k_dense must be 0..n_layers ({self.n_layers}), got {self.first_k_dense}")
        if self.window < 1 or self.n_global_tokens < 0:
            problems.append("window must be >= 1 and n_global_tokens >= 0")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "ffn_dim", "moe_ffn_dim"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if problems:
            raise ConfigError("invalid ModelConfig: " + "; ".join(problems))
        if self.shared_ffn_dim is None:
            self.shared_ffn_dim = self.n_shared_experts * self.moe_ffn_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.first_k_dense

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        return from_dict(cls, data)


PRESETS: dict[str, dict] = {
    # Unit tests: builds in milliseconds.
    "tiny": {},
    # The quickstart on 2 CPU cores: ~10M parameters, 8 experts of which 2 active, one shared expert.
    "small": dict(
        vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, max_seq_len=2048,
        first_k_dense=1, ffn_dim=768, moe_ffn_dim=256, n_routed_experts=8, n_shared_experts=1,
        top_k=2, router="sigmoid", tie_embeddings=True,
    ),
    # The anchor of our benchmarks: the tiny Mixtral measured in shared/reference/cpu-baseline.md.
    "mixtral-tiny": dict(
        vocab_size=8192, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, max_seq_len=2048,
        moe_ffn_dim=512, n_routed_experts=8, top_k=2, router="softmax",
    ),
    # GPU sizes, DeepSeek-V3 shaped (sigmoid router, fine-grained experts, shared expert, dense first layer).
    "base": dict(
        vocab_size=32000, d_model=1024, n_layers=16, n_heads=16, n_kv_heads=4, max_seq_len=4096,
        first_k_dense=1, ffn_dim=4096, moe_ffn_dim=512, n_routed_experts=64, n_shared_experts=2,
        top_k=6, router="sigmoid", routed_scaling_factor=2.5,
    ),
    "large": dict(
        vocab_size=64000, d_model=2048, n_layers=28, n_heads=16, n_kv_heads=4, max_seq_len=8192,
        first_k_dense=1, ffn_dim=8192, moe_ffn_dim=1024, n_routed_experts=128, n_shared_experts=2,
        top_k=8, router="sigmoid", routed_scaling_factor=2.5,
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named preset, with optional field overrides: ``preset("tiny", n_routed_experts=16)``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return from_dict(ModelConfig, {**PRESETS[name], **overrides})
