"""Mixture-of-Experts feed-forward layer: a router, routed experts behind a dispatcher, optional shared experts.

Legend: N tokens (batch and sequence flattened), D model width, F expert width, E routed experts,
K experts per token.

The pieces, one file each: :mod:`deepseek.nn.router` (which experts, with which weights),
:mod:`deepseek.nn.dispatch` (which rows reach which expert, and back: local sorted/grouped, host-grouped
decoding, gathered compiled decoding, the exportable loop; expert parallelism adds an all-to-all one),
:mod:`deepseek.nn.experts` (the expert products; :mod:`deepseek.nn.quantized` has the int8/int4 ones) and
:mod:`deepseek.nn.grouped_mm` (the grouped matmul kernel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from deepseek.nn.dispatch import FEW_PAIRS, Dispatcher
from deepseek.nn.experts import GroupedExperts
from deepseek.nn.grouped_mm import BF16_GROUP_ROWS, bucketed_layout, grouped_matmul
from deepseek.nn.mlp import SwiGLU
from deepseek.nn.router import Router, RouterConfig, load_balancing_loss, update_router_biases

__all__ = ["BF16_GROUP_ROWS", "FEW_PAIRS", "GroupedExperts", "MoE", "MoEConfig", "Router", "RouterConfig",
           "bucketed_layout", "grouped_matmul", "load_balancing_loss", "update_router_biases"]


@dataclass(frozen=True)
class MoEConfig:
    """One MoE layer's settings (the model builds it from its config: :func:`deepseek.models.transformer.moe_config`)."""

    d_model: int
    ffn_dim: int  # width of one routed expert
    router: RouterConfig  # the number of routed experts and how tokens choose them
    n_shared_experts: int = 0
    shared_ffn_dim: int = 0  # width of the always-on shared SwiGLU (all shared experts as one)
    shared_expert_gate: bool = False  # Qwen2-MoE scales the shared expert by sigmoid(gate(x))


class MoE(nn.Module):
    """Routed experts plus optional always-on shared experts (DeepSeekMoE).

    ``dispatcher``: how the routed experts are reached (default :class:`~deepseek.nn.dispatch.LocalDispatch`),
    kept by ``self.experts``.
    """

    def __init__(self, config: MoEConfig, dispatcher: Optional[Dispatcher] = None):
        super().__init__()
        self.router = Router(config.d_model, config.router)
        self.experts = GroupedExperts(config.router.n_experts, config.d_model, config.ffn_dim, dispatcher)
        self.shared = SwiGLU(config.d_model, config.shared_ffn_dim) if config.n_shared_experts > 0 else None
        self.shared_gate = (nn.Linear(config.d_model, 1, bias=False)
                            if self.shared is not None and config.shared_expert_gate else None)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        weights_NK, experts_NK = self.router(x_ND)
        y_ND = self.experts(x_ND, weights_NK, experts_NK)
        if self.shared is not None:
            shared = self.shared(x_ND)
            if self.shared_gate is not None:
                shared = shared * torch.sigmoid(self.shared_gate(x_ND))
            y_ND = y_ND + shared
        return y_ND.view(x_BTD.shape)
