"""Top-k routing of tokens to experts, its load-balancing loss and the aux-loss-free balancing bias.

Legend: N tokens, D model width, E routed experts, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class RouterConfig:
    """How tokens choose experts (built by the model from its config; defaults are Mixtral's)."""

    n_experts: int
    top_k: int
    kind: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk_prob: bool = True  # renormalise the k chosen weights to sum to 1
    scaling: float = 1.0  # routed_scaling_factor: the chosen weights times this
    aux_loss_coef: float = 0.0  # Switch-style load-balancing loss weight (0 = off)
    bias_update_speed: float = 1e-3  # step of the aux-loss-free balancing bias (sigmoid router)


class Router(nn.Module):
    """Top-k router. Scores are computed in fp32 whatever the activation dtype.

    ``softmax`` (Mixtral): softmax over all experts, keep the top k.
    ``sigmoid`` (DeepSeek-V3): independent sigmoid scores; a per-expert ``expert_bias`` is added for
    the *choice* of experts only (the weights come from the unbiased scores). The bias is balancing
    state, updated outside ``forward`` by :func:`update_router_biases` from the accumulated load.

    The settings of ``config`` are copied to attributes of the same names (``kind``, ``scaling``, ...), which
    may be changed afterwards.
    """

    def __init__(self, d_model: int, config: RouterConfig):
        super().__init__()
        self.n_experts, self.top_k, self.kind = config.n_experts, config.top_k, config.kind
        self.norm_topk_prob, self.scaling, self.aux_loss_coef = config.norm_topk_prob, config.scaling, config.aux_loss_coef
        self.bias_update_speed = config.bias_update_speed
        self.weight = nn.Parameter(torch.empty(config.n_experts, d_model))
        self.register_buffer("expert_bias", torch.zeros(config.n_experts))
        # Tokens routed to each expert since the last bias update (training only; not checkpointed).
        self.register_buffer("load_accum", torch.zeros(config.n_experts), persistent=False)
        self._last_experts: Optional[torch.Tensor] = None
        self.aux_loss: Optional[torch.Tensor] = None

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns routing weights [N, K] (fp32) and expert indices [N, K]."""
        if torch.is_autocast_enabled(x_ND.device.type):  # autocast would run the linear in bf16
            with torch.autocast(x_ND.device.type, enabled=False):
                logits_NE = F.linear(x_ND.float(), self.weight.float())
        else:
            logits_NE = F.linear(x_ND.float(), self.weight.float())
        if self.kind == "softmax":
            scores_NE = logits_NE.softmax(dim=-1)
            weights_NK, experts_NK = scores_NE.topk(self.top_k, dim=-1)
        else:
            scores_NE = logits_NE.sigmoid()
            _, experts_NK = (scores_NE + self.expert_bias).topk(self.top_k, dim=-1)
            weights_NK = scores_NE.gather(1, experts_NK)
        if self.norm_topk_prob:  # with k = 1 this makes the weight 1, as in Mixtral
            weights_NK = weights_NK / (weights_NK.sum(dim=-1, keepdim=True) + 1e-20)
        if self.scaling != 1.0:
            weights_NK = weights_NK * self.scaling

        self._last_experts = experts_NK  # counted lazily: decoding never pays for statistics nobody reads
        self.aux_loss = None
        if self.aux_loss_coef > 0 and self.training:
            self.aux_loss = self.aux_loss_coef * load_balancing_loss(scores_NE, self.last_tokens_per_expert)
        return weights_NK, experts_NK

    @property
    def last_tokens_per_expert(self) -> Optional[torch.Tensor]:
        """How many of the last forward's (token, expert) pairs went to each expert: [E] float."""
        if self._last_experts is None:
            return None
        flat = self._last_experts.flatten()
        return torch.zeros(self.n_experts, device=flat.device).index_add_(
            0, flat, torch.ones(flat.numel(), device=flat.device))


def load_balancing_loss(scores_NE: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer auxiliary loss ``E * sum_i f_i * P_i``; equals 1 when perfectly balanced.

    f_i: fraction of routed (token, expert) pairs that went to expert i (no gradient);
    P_i: mean normalised router score of expert i (carries the gradient).
    """
    n_experts = scores_NE.shape[-1]
    f = tokens_per_expert / tokens_per_expert.sum().clamp_min(1)
    probs = scores_NE / scores_NE.sum(dim=-1, keepdim=True)
    return n_experts * (f.detach() * probs.mean(dim=0)).sum()


@torch.no_grad()
def update_router_biases(model: nn.Module, speed: Optional[float] = None) -> None:
    """Auxiliary-loss-free balancing (DeepSeek-V3): nudge each sigmoid router's bias toward balance.

    ``bias_i += speed * sign(mean_load - load_i)``, with the load accumulated since the last call;
    meant to run once per optimizer step (e.g. an optimizer pre-step hook). ``speed`` defaults to
    each router's own ``bias_update_speed`` (from the model config).
    """
    for module in model.modules():
        if isinstance(module, Router) and module.kind == "sigmoid":
            load = module.load_accum
            if load.sum() == 0:
                continue
            step = speed if speed is not None else module.bias_update_speed
            module.expert_bias += step * torch.sign(load.mean() - load)
            load.zero_()
