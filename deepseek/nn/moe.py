"""Mixture-of-Experts feed-forward: router, grouped experts, sparse dispatch.

Legend: N tokens (batch and sequence flattened), D model width, F expert width, E routed experts,
K experts per token.

Dispatch is sparse: the N*K (token, expert) pairs are sorted by expert, each expert multiplies only
its own rows (one grouped matmul over 3-D weights for all experts), and the results are scattered
back with their routing weights. Work and memory grow with N*K, not with E.
"""

from __future__ import annotations

import itertools
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from deepseek.nn.few_rows import few_row_linear
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


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


if _HAS_GROUPED_MM:
    # torch.compile cannot trace torch._grouped_mm in fp32 (its meta function accepts bf16 only), so under
    # compile the same kernel runs as an opaque custom op with an explicit backward. Eager calls
    # torch._grouped_mm directly and keeps its built-in autograd.
    @torch.library.custom_op("deepseek::grouped_mm", mutates_args=())
    def _grouped_mm_op(x_MI: torch.Tensor, w_EIO: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        return torch._grouped_mm(x_MI, w_EIO, offs=offsets_E)

    @_grouped_mm_op.register_fake
    def _(x_MI, w_EIO, offsets_E):
        return x_MI.new_empty(x_MI.shape[0], w_EIO.shape[-1])

    @torch.library.custom_op("deepseek::grouped_mm_backward", mutates_args=())
    def _grouped_mm_backward_op(grad_MO: torch.Tensor, x_MI: torch.Tensor, w_EIO: torch.Tensor,
                                offsets_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grad_x = torch._grouped_mm(grad_MO, w_EIO.transpose(-2, -1), offs=offsets_E)
        grad_w = torch._grouped_mm(x_MI.t(), grad_MO, offs=offsets_E)  # [E, I, O]; zeros for empty groups
        return grad_x, grad_w

    @_grouped_mm_backward_op.register_fake
    def _(grad_MO, x_MI, w_EIO, offsets_E):
        # The kernel returns contiguous gradients whatever the strides of its inputs (w is often a transposed view).
        return x_MI.new_empty(x_MI.shape), w_EIO.new_empty(w_EIO.shape)

    def _grouped_mm_setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _grouped_mm_backward(ctx, grad_MO):
        x_MI, w_EIO, offsets_E = ctx.saved_tensors
        grad_x, grad_w = _grouped_mm_backward_op(grad_MO.contiguous(), x_MI, w_EIO, offsets_E)
        return grad_x, grad_w, None

    _grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup_context)


# bf16 expert products on CPU run through oneDNN, which builds a kernel for every new row count and keeps a few
# hundred: with per-expert counts that change every batch, a bf16 product of [~500, 256] x [256, 512] took 3.3 ms
# (building) instead of 0.58 ms (cached), against fp32's 1.06 ms (MKL, no building). Rounding every group up to a
# multiple of this many zero-padded rows bounds the distinct shapes, at the cost of the padding rows.
BF16_GROUP_ROWS = 64


def bucketed_layout(expert_of_pair: torch.Tensor, counts_E: torch.Tensor, offsets_E: torch.Tensor,
                    multiple: int = BF16_GROUP_ROWS) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Where the expert-sorted pairs go when every expert's group is padded to a multiple of ``multiple`` rows.

    Returns (row of each sorted pair [P], the padded groups' end offsets [E], total rows). The total depends only
    on the number of pairs and experts (no host read of the counts): the last group takes the slack, so every
    row belongs to a group and the total is a multiple of ``multiple`` too.
    """
    pairs, n_experts = expert_of_pair.shape[0], counts_E.shape[0]
    padded = (counts_E + multiple - 1) // multiple * multiple
    padded_ends = padded.cumsum(0, dtype=torch.int32)
    shift = (padded_ends - padded) - (offsets_E - counts_E)  # padded start - packed start, per expert
    total = -(-(pairs + n_experts * (multiple - 1)) // multiple) * multiple
    padded_ends[-1] = total
    rows = torch.arange(pairs, device=expert_of_pair.device) + shift[expert_of_pair]
    return rows, padded_ends, total


def grouped_matmul(x_MI: torch.Tensor, w_EIO: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Rows ``offsets[e-1]:offsets[e]`` of ``x`` times ``w[e]``, for every expert, in one call: [M, O]."""
    # torch._grouped_mm needs 16-byte aligned rows: I and O times the element size a multiple of 16.
    aligned = (x_MI.shape[-1] * x_MI.element_size()) % 16 == 0 and (w_EIO.shape[-1] * w_EIO.element_size()) % 16 == 0
    if _HAS_GROUPED_MM and aligned:
        if torch.compiler.is_compiling():
            return _grouped_mm_op(x_MI, w_EIO, offsets_E)
        return torch._grouped_mm(x_MI, w_EIO, offs=offsets_E)
    # Fallback for torch builds without grouped_mm or odd widths: a loop over experts (host sync for the sizes).
    bounds = [0] + offsets_E.tolist()
    return torch.cat([x_MI[a:b] @ w_EIO[e] for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))])


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as 3-D weights in the (out, in) layout of nn.Linear and of Hugging Face's
    fused experts: ``gate_up`` [E, 2F, D] (gate rows first, then up) and ``down`` [E, D, F]."""

    def __init__(self, n_experts: int, d_model: int, ffn_dim: int):
        super().__init__()
        self.n_experts, self.ffn_dim = n_experts, ffn_dim
        self.gate_up = nn.Parameter(torch.empty(n_experts, 2 * ffn_dim, d_model))
        self.down = nn.Parameter(torch.empty(n_experts, d_model, ffn_dim))

    def forward(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():  # torch.export / ONNX: no host reads, no grouped_mm (no ONNX op)
            return self._forward_exportable(x_ND, weights_NK, experts_NK)
        if x_ND.shape[0] * experts_NK.shape[1] <= FEW_PAIRS and not torch.is_grad_enabled():
            if torch.compiler.is_compiling():
                return self._forward_gathered(x_ND, weights_NK, experts_NK)
            if x_ND.device.type == "cpu":
                return self._forward_few_tokens(x_ND, weights_NK, experts_NK)
        return self.forward_sorted(x_ND, weights_NK, experts_NK, self.gate_up, self.down)

    def forward_sorted(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor,
                       gate_up_EFD: torch.Tensor, down_EDF: torch.Tensor,
                       rows_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """The sorted dispatch with the given expert weights; ``rows_fn`` (if any) transforms the rows entering
        each product (quantization-aware training fake-quantizes weights and rows through this)."""
        N, D = x_ND.shape
        K = experts_NK.shape[1]
        flat_experts = experts_NK.flatten()
        order = flat_experts.argsort(stable=True)  # (token, expert) pairs grouped by expert
        token_of_pair = order // K
        counts = torch.zeros(self.n_experts, dtype=torch.int32, device=x_ND.device).index_add_(
            0, flat_experts, torch.ones_like(flat_experts, dtype=torch.int32))
        offsets = counts.cumsum(0, dtype=torch.int32)

        # grouped_mm is not autocast-aware: cast explicitly so bf16 autocast really runs the experts in bf16.
        dtype = _autocast_dtype(x_ND) or x_ND.dtype
        x_sorted = x_ND[token_of_pair].to(dtype)
        bucketed = dtype == torch.bfloat16 and x_ND.device.type == "cpu"
        if bucketed:  # every group a multiple of BF16_GROUP_ROWS rows: see bucketed_layout
            rows_of_pair, offsets, total = bucketed_layout(flat_experts[order], counts, offsets)
            x_sorted = x_sorted.new_zeros(total, D).index_copy(0, rows_of_pair, x_sorted)
        if rows_fn is not None:
            x_sorted = rows_fn(x_sorted)
        gate_up = grouped_matmul(x_sorted, gate_up_EFD.to(dtype).transpose(1, 2), offsets)
        gate, up = gate_up.split(self.ffn_dim, dim=-1)
        hidden = F.silu(gate) * up
        if rows_fn is not None:
            hidden = rows_fn(hidden)
        y_sorted = grouped_matmul(hidden, down_EDF.to(dtype).transpose(1, 2), offsets)
        if bucketed:
            y_sorted = y_sorted[rows_of_pair]
        y_sorted = y_sorted * weights_NK.flatten()[order].unsqueeze(-1).to(dtype)
        return torch.zeros(N, D, dtype=dtype, device=x_ND.device).index_add_(0, token_of_pair, y_sorted)

    def _forward_exportable(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor) -> torch.Tensor:
        """Export path (torch.export, ONNX): :meth:`forward_reference` without its host-side skip of idle experts.

        Each expert's rows come from ``nonzero`` (a data-dependent size in the graph, NonZero + Gather in ONNX)
        instead of host reads or ``torch._grouped_mm``, which has no ONNX form. Only the chosen (token, expert)
        pairs are computed; the graph holds E unrolled expert blocks per layer. Same result as the other paths.
        """
        out = torch.zeros_like(x_ND)
        for e in range(self.n_experts):
            token_idx, slot = (experts_NK == e).nonzero(as_tuple=True)
            gate, up = F.linear(x_ND[token_idx], self.gate_up[e]).split(self.ffn_dim, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down[e])
            out = out.index_add(0, token_idx, y * weights_NK[token_idx, slot].unsqueeze(-1).to(y.dtype))
        return out

    def _forward_gathered(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor) -> torch.Tensor:
        """Compiled decoding path: each (token, expert) pair reads its expert's rows directly.

        Written as gather + multiply + row sums (no host reads, fixed shapes), which inductor fuses into
        one loop over the chosen weights; in a compiled batch-1 step this is ~1.5x faster than eager
        (docs/benchmarks.md).
        """
        N, D = x_ND.shape
        K = experts_NK.shape[1]
        dtype = _autocast_dtype(x_ND) or x_ND.dtype
        flat = experts_NK.flatten()
        x_PD = x_ND.to(dtype).repeat_interleave(K, dim=0)
        gate_up_PF = (self.gate_up[flat].to(dtype) * x_PD.unsqueeze(1)).sum(dim=-1)
        hidden_PF = F.silu(gate_up_PF[:, :self.ffn_dim]) * gate_up_PF[:, self.ffn_dim:]
        y_PD = (self.down[flat].to(dtype) * hidden_PF.unsqueeze(1)).sum(dim=-1)
        return (y_PD.view(N, K, D) * weights_NK.view(N, K, 1).to(dtype)).sum(dim=1)

    def _forward_few_tokens(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor) -> torch.Tensor:
        """Decoding path: the same sorted dispatch, with the grouping done on the host.

        With a handful of tokens the device-side sort and the grouped matmul (whose CPU kernel walks
        every expert, empty or not, reading each offset back) cost more than the arithmetic; reading
        the choices on the host is free on CPU, and then only the chosen experts are visited.
        """
        K = experts_NK.shape[1]
        dtype = _autocast_dtype(x_ND) or x_ND.dtype
        choices = experts_NK.flatten().tolist()
        if x_ND.shape[0] == 1:  # one token (batch-1 decoding): a weighted sum of its K experts, no sorting
            x = x_ND.to(dtype)
            out = None
            for expert, weight in zip(choices, weights_NK[0].tolist()):
                gate_up = few_row_linear(x, self.gate_up[expert].to(dtype))
                hidden = F.silu(gate_up[:, :self.ffn_dim]).mul_(gate_up[:, self.ffn_dim:])
                y = few_row_linear(hidden, self.down[expert].to(dtype)).mul_(weight)
                out = y if out is None else out.add_(y)
            return out
        order = sorted(range(len(choices)), key=choices.__getitem__)
        order_t = torch.tensor(order, device=x_ND.device)
        token_of_pair = order_t // K
        x_sorted = x_ND[token_of_pair].to(dtype)
        y_sorted = torch.empty_like(x_sorted)
        start = 0
        for expert, pairs in itertools.groupby(order, key=choices.__getitem__):
            end = start + sum(1 for _ in pairs)
            gate_up = few_row_linear(x_sorted[start:end], self.gate_up[expert].to(dtype))
            hidden = F.silu(gate_up[:, :self.ffn_dim]).mul_(gate_up[:, self.ffn_dim:])
            y_sorted[start:end] = few_row_linear(hidden, self.down[expert].to(dtype))
            start = end
        y_sorted.mul_(weights_NK.flatten()[order_t].unsqueeze(-1).to(dtype))
        return x_sorted.new_zeros(x_ND.shape).index_add_(0, token_of_pair, y_sorted)

    def forward_reference(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor) -> torch.Tensor:
        """Slow, obviously correct: a loop over experts, each applied to the tokens that chose it."""
        out = torch.zeros_like(x_ND)
        for e in range(self.n_experts):
            token_idx, slot = (experts_NK == e).nonzero(as_tuple=True)
            if token_idx.numel() == 0:
                continue
            gate, up = F.linear(x_ND[token_idx], self.gate_up[e]).split(self.ffn_dim, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down[e])
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
