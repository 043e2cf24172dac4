"""Mixture-of-Experts feed-forward: router, grouped experts, sparse dispatch.

Legend: N tokens (batch and sequence flattened), D model width, F expert width, E routed experts,
K experts per token.

Dispatch is sparse: the N*K (token, expert) pairs are sorted by expert, each expert multiplies only
its own rows (one grouped matmul over 3-D weights for all experts), and the results are scattered
back with their routing weights. Work and memory grow with N*K, not with E.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from deepseek.nn.mlp import SwiGLU

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")
# Below this many (token, expert) pairs, inference on CPU visits the chosen experts directly (decoding).
FEW_PAIRS = 64


class Router(nn.Module):
    """Top-k router. Scores are computed in fp32 whatever the activation dtype.

    ``softmax`` (Mixtral): softmax over all experts, keep the top k.
    ``sigmoid`` (DeepSeek-V3): independent sigmoid scores; a per-expert ``expert_bias`` is added for
    the *choice* of experts only (the weights come from the unbiased scores). The bias is balancing
    state, updated outside ``forward`` by :func:`update_router_biases` from the accumulated load.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, kind: Literal["softmax", "sigmoid"] = "softmax",
                 norm_topk_prob: bool = True, scaling: float = 1.0, aux_loss_coef: float = 0.0,
                 bias_update_speed: float = 1e-3):
        super().__init__()
        self.n_experts, self.top_k, self.kind = n_experts, top_k, kind
        self.norm_topk_prob, self.scaling, self.aux_loss_coef = norm_topk_prob, scaling, aux_loss_coef
        self.bias_update_speed = bias_update_speed
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        self.register_buffer("expert_bias", torch.zeros(n_experts))
        # Tokens routed to each expert since the last bias update (training only; not checkpointed).
        self.register_buffer("load_accum", torch.zeros(n_experts), persistent=False)
        self.last_tokens_per_expert: Optional[torch.Tensor] = None
        self.aux_loss: Optional[torch.Tensor] = None

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns routing weights [N, K] (fp32) and expert indices [N, K]."""
        with torch.autocast(x_ND.device.type, enabled=False):  # autocast would run the linear in bf16
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
        weights_NK = weights_NK * self.scaling

        tokens_per_expert = torch.zeros(self.n_experts, device=x_ND.device).index_add_(
            0, experts_NK.flatten(), torch.ones(experts_NK.numel(), device=x_ND.device))
        self.last_tokens_per_expert = tokens_per_expert
        self.aux_loss = None
        if self.aux_loss_coef > 0 and self.training:
            self.aux_loss = self.aux_loss_coef * load_balancing_loss(scores_NE, tokens_per_expert, self.top_k)
        return weights_NK, experts_NK


def load_balancing_loss(scores_NE: torch.Tensor, tokens_per_expert: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss ``E * sum_i f_i * P_i``; equals 1 when perfectly balanced.

    f_i: fraction of routed (token, expert) pairs that went to expert i (no gradient);
    P_i: mean normalised router score of expert i (carries the gradient).
    """
    n_experts = scores_NE.shape[-1]
    f = tokens_per_expert / tokens_per_expert.sum().clamp_min(1)
    probs = scores_NE / scores_NE.sum(dim=-1, keepdim=True)
    return n_experts * (f.detach() * probs.mean(dim=0)).sum()


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def grouped_matmul(x_MI: torch.Tensor, w_EIO: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Rows ``offsets[e-1]:offsets[e]`` of ``x`` times ``w[e]``, for every expert, in one call: [M, O]."""
    # torch._grouped_mm needs 16-byte aligned rows: I and O times the element size a multiple of 16.
    aligned = (x_MI.shape[-1] * x_MI.element_size()) % 16 == 0 and (w_EIO.shape[-1] * w_EIO.element_size()) % 16 == 0
    if _HAS_GROUPED_MM and aligned:
        return torch._grouped_mm(x_MI, w_EIO, offs=offsets_E)
    # Fallback for torch builds without grouped_mm or odd widths: a loop over experts (host sync for the sizes).
    bounds = [0] + offsets_E.tolist()
    return torch.cat([x_MI[a:b] @ w_EIO[e] for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))])


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as 3-D weights: ``gate_up`` [E, D, 2F] and ``down`` [E, F, D]."""

    def __init__(self, n_experts: int, d_model: int, ffn_dim: int):
        super().__init__()
        self.n_experts, self.ffn_dim = n_experts, ffn_dim
        self.gate_up = nn.Parameter(torch.empty(n_experts, d_model, 2 * ffn_dim))
        self.down = nn.Parameter(torch.empty(n_experts, ffn_dim, d_model))

    def forward(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor) -> torch.Tensor:
        N, D = x_ND.shape
        K = experts_NK.shape[1]
        if N * K <= FEW_PAIRS and x_ND.device.type == "cpu" and not torch.is_grad_enabled():
            return self._forward_few_tokens(x_ND, weights_NK, experts_NK)
        flat_experts = experts_NK.flatten()
        order = flat_experts.argsort(stable=True)  # (token, expert) pairs grouped by expert
        token_of_pair = order // K
        counts = torch.zeros(self.n_experts, dtype=torch.int32, device=x_ND.device).index_add_(
            0, flat_experts, torch.ones_like(flat_experts, dtype=torch.int32))
        offsets = counts.cumsum(0, dtype=torch.int32)

        # grouped_mm is not autocast-aware: cast explicitly so bf16 autocast really runs the experts in bf16.
        dtype = _autocast_dtype(x_ND) or x_ND.dtype
        x_sorted = x_ND[token_of_pair].to(dtype)
        gate_up = grouped_matmul(x_sorted, self.gate_up.to(dtype), offsets)
        gate, up = gate_up.split(self.ffn_dim, dim=-1)
        y_sorted = grouped_matmul(F.silu(gate) * up, self.down.to(dtype), offsets)
        y_sorted = y_sorted * weights_NK.flatten()[order].unsqueeze(-1).to(dtype)
        return torch.zeros(N, D, dtype=dtype, device=x_ND.device).index_add_(0, token_of_pair, y_sorted)

    def _forward_few_tokens(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor) -> torch.Tensor:
        """Decoding path: visit only the experts that were chosen.

        With a handful of tokens, the sort and the grouped matmul (whose CPU kernel walks every expert,
        empty or not) cost more than the arithmetic. Reading the choices on the host is free on CPU.
        """
        dtype = _autocast_dtype(x_ND) or x_ND.dtype
        x = x_ND.to(dtype)
        out = torch.zeros_like(x)
        pairs: dict[int, list[int]] = {}
        for pair, expert in enumerate(experts_NK.flatten().tolist()):
            pairs.setdefault(expert, []).append(pair)
        K = experts_NK.shape[1]
        flat_weights = weights_NK.flatten()
        for expert, pair_list in pairs.items():
            pair_idx = torch.tensor(pair_list, device=x.device)
            token_idx = pair_idx // K
            gate, up = (x[token_idx] @ self.gate_up[expert].to(dtype)).split(self.ffn_dim, dim=-1)
            y = (F.silu(gate) * up) @ self.down[expert].to(dtype)
            out.index_add_(0, token_idx, y * flat_weights[pair_idx].unsqueeze(-1).to(dtype))
        return out

    def forward_reference(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor) -> torch.Tensor:
        """Slow, obviously correct: a loop over experts, each applied to the tokens that chose it."""
        out = torch.zeros_like(x_ND)
        for e in range(self.n_experts):
            token_idx, slot = (experts_NK == e).nonzero(as_tuple=True)
            if token_idx.numel() == 0:
                continue
            gate, up = (x_ND[token_idx] @ self.gate_up[e]).split(self.ffn_dim, dim=-1)
            y = (F.silu(gate) * up) @ self.down[e]
            out.index_add_(0, token_idx, y * weights_NK[token_idx, slot].unsqueeze(-1).to(y.dtype))
        return out


class MoE(nn.Module):
    """Routed experts plus optional always-on shared experts (DeepSeekMoE)."""

    def __init__(self, d_model: int, n_routed_experts: int, moe_ffn_dim: int, top_k: int,
                 router: Literal["softmax", "sigmoid"] = "softmax", n_shared_experts: int = 0,
                 shared_ffn_dim: int = 0, shared_expert_gate: bool = False, norm_topk_prob: bool = True,
                 routed_scaling_factor: float = 1.0, aux_loss_coef: float = 0.0, bias_update_speed: float = 1e-3):
        super().__init__()
        self.router = Router(d_model, n_routed_experts, top_k, router, norm_topk_prob, routed_scaling_factor,
                             aux_loss_coef, bias_update_speed)
        self.experts = GroupedExperts(n_routed_experts, d_model, moe_ffn_dim)
        self.shared = SwiGLU(d_model, shared_ffn_dim) if n_shared_experts > 0 else None
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if self.shared is not None and shared_expert_gate else None

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
