"""Building blocks of the MoE transformer, one small module each."""

from deepseek.nn.attention import Attention, AttentionInputs
from deepseek.nn.dispatch import LocalDispatch
from deepseek.nn.experts import GroupedExperts
from deepseek.nn.focal_loss import FocalLoss
from deepseek.nn.kv_cache import KVCache
from deepseek.nn.loss import linear_cross_entropy
from deepseek.nn.mlp import SwiGLU
from deepseek.nn.moe import MoE, MoEConfig
from deepseek.nn.norm import RMSNorm
from deepseek.nn.rope import RotaryEmbedding, apply_rotary
from deepseek.nn.router import Router, RouterConfig, load_balancing_loss, update_router_biases
from deepseek.nn.slot_cache import SlotKVCache
from deepseek.nn.sparse_attention import (
    blocked_local_global_attention,
    dense_local_global_attention,
    local_global_mask,
)

__all__ = [
    "Attention", "AttentionInputs", "FocalLoss", "GroupedExperts", "KVCache", "LocalDispatch", "MoE", "MoEConfig", "RMSNorm",
    "Router", "RouterConfig", "RotaryEmbedding", "SlotKVCache", "SwiGLU", "apply_rotary",
    "blocked_local_global_attention", "dense_local_global_attention", "linear_cross_entropy", "load_balancing_loss",
    "local_global_mask", "update_router_biases",
]
