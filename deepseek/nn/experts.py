"""Routed experts: E SwiGLU experts with 3-D weights, and the expert-compute interface every dispatcher uses.

Legend: N tokens, D model width, F expert width, E experts, K experts per token, M rows grouped by expert,
P = N*K (token, expert) pairs.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from deepseek.nn.dispatch import LOOP, Dispatcher, LocalDispatch
from deepseek.nn.few_rows import few_row_linear
from deepseek.nn.grouped_mm import bucketed_layout, grouped_matmul
from deepseek.nn.mlp import swiglu_of_fused

Span = tuple[int, int, int]  # (expert, first row, end row)


class ExpertCompute(Protocol):
    """The expert products a dispatcher calls; rows enter in :meth:`rows_dtype`, results leave in it too.

    Implemented by :class:`GroupedProduct` (fp32/bf16 weights; :class:`GroupedExperts` is one) and by
    :class:`deepseek.nn.quantized.QuantizedExperts` (int8/int4 weights).
    """

    n_experts: int

    def rows_dtype(self, x_ND: torch.Tensor) -> torch.dtype:
        """The dtype the dispatcher gives rows in and combines results in."""

    def grouped(self, x_MD: torch.Tensor, counts_E: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert (``counts[e]`` rows of expert e, ending at ``offsets[e]``), all experts: [M, D]."""

    def spans(self, x_MD: torch.Tensor, spans: list[Span]) -> list[torch.Tensor]:
        """Inference only: expert e on rows a:b of ``x`` for each ``(e, a, b)`` (spans may overlap)."""

    def expert(self, e: int, x_MD: torch.Tensor) -> torch.Tensor:
        """Expert e on all rows of ``x`` in plain differentiable, exportable ops (the loop dispatch): [M, D]."""


def span_rows(x_MD: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Rows a:b of ``x``; ``x`` itself when that is all of it (one-token decoding: no slice op per expert)."""
    return x_MD if b - a == x_MD.shape[0] else x_MD[a:b]


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class GroupedProduct:
    """:class:`ExpertCompute` of floating-point SwiGLU experts ``down(silu(gate x) * up x)`` with 3-D weights in
    the (out, in) layout of nn.Linear: ``gate_up`` [E, 2F, D] (gate rows first, then up), ``down`` [E, D, F].

    Products run in the autocast dtype if autocast is on (grouped_mm is not autocast-aware), else in the rows'.
    ``rows_fn`` (if any) transforms the rows entering each grouped product (QAT fake-quantizes them through it).
    """

    rows_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def __init__(self, gate_up_EFD: torch.Tensor, down_EDF: torch.Tensor,
                 rows_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self.gate_up, self.down, self.rows_fn = gate_up_EFD, down_EDF, rows_fn
        self.n_experts, self.ffn_dim = gate_up_EFD.shape[0], down_EDF.shape[-1]

    def rows_dtype(self, x_ND: torch.Tensor) -> torch.dtype:
        return _autocast_dtype(x_ND) or x_ND.dtype

    def grouped(self, x_MD: torch.Tensor, counts_E: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        """One grouped matmul per projection over all experts (no host read)."""
        dtype, gate_up_w, down_w = x_MD.dtype, self.gate_up, self.down
        if x_MD.shape[0] == 0:
            # No rows for any expert (an expert-parallel rank may receive none): keep the weights in the graph so
            # that their gradient is zero, not None.
            return x_MD + 0.0 * (gate_up_w.sum() + down_w.sum()).to(dtype)
        bucketed = dtype == torch.bfloat16 and x_MD.device.type == "cpu"
        if bucketed:  # every group a multiple of BF16_GROUP_ROWS rows: see bucketed_layout
            expert_of_row = torch.arange(counts_E.shape[0], device=x_MD.device).repeat_interleave(
                counts_E, output_size=x_MD.shape[0])
            rows_of_pair, offsets_E, total = bucketed_layout(expert_of_row, counts_E, offsets_E)
            x_MD = x_MD.new_zeros(total, x_MD.shape[1]).index_copy(0, rows_of_pair, x_MD)
        if self.rows_fn is not None:
            x_MD = self.rows_fn(x_MD)
        hidden = swiglu_of_fused(grouped_matmul(x_MD, gate_up_w.to(dtype).transpose(1, 2), offsets_E), self.ffn_dim)
        if self.rows_fn is not None:
            hidden = self.rows_fn(hidden)
        y_MD = grouped_matmul(hidden, down_w.to(dtype).transpose(1, 2), offsets_E)
        return y_MD[rows_of_pair] if bucketed else y_MD

    def spans(self, x_MD: torch.Tensor, spans: list[Span]) -> list[torch.Tensor]:
        """Each chosen expert's two products on its few rows, arranged as this CPU streams them fastest."""
        out, M = [], x_MD.shape[0]
        for e, a, b in spans:
            gate_up = few_row_linear(x_MD if b - a == M else x_MD[a:b], self.gate_up[e].to(x_MD.dtype))
            hidden = F.silu(gate_up[:, :self.ffn_dim]).mul_(gate_up[:, self.ffn_dim:])
            out.append(few_row_linear(hidden, self.down[e].to(x_MD.dtype)))
        return out

    def expert(self, e: int, x_MD: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x_MD, self.gate_up[e]).split(self.ffn_dim, dim=-1)
        return F.linear(F.silu(gate) * up, self.down[e])

    def pairs(self, x_PD: torch.Tensor, expert_of_pair: torch.Tensor) -> torch.Tensor:
        """Each pair's expert on its row, the weights gathered per pair (compiled decoding): [P, D]."""
        dtype = x_PD.dtype
        gate_up_PF = (self.gate_up[expert_of_pair].to(dtype) * x_PD.unsqueeze(1)).sum(dim=-1)
        hidden_PF = F.silu(gate_up_PF[:, :self.ffn_dim]) * gate_up_PF[:, self.ffn_dim:]
        return (self.down[expert_of_pair].to(dtype) * hidden_PF.unsqueeze(1)).sum(dim=-1)


class GroupedExperts(GroupedProduct, nn.Module):
    """E SwiGLU experts stored as 3-D weights in the (out, in) layout of nn.Linear and of Hugging Face's
    fused experts: ``gate_up`` [E, 2F, D] (gate rows first, then up) and ``down`` [E, D, F].

    The module is its own :class:`GroupedProduct`; ``dispatcher`` (default :class:`LocalDispatch`) decides which
    rows reach which expert. Expert parallelism replaces the dispatcher from outside.
    """

    def __init__(self, n_experts: int, d_model: int, ffn_dim: int, dispatcher: Optional[Dispatcher] = None):
        nn.Module.__init__(self)
        self.n_experts, self.ffn_dim = n_experts, ffn_dim
        self.gate_up = nn.Parameter(torch.empty(n_experts, 2 * ffn_dim, d_model))
        self.down = nn.Parameter(torch.empty(n_experts, d_model, ffn_dim))
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatch()

    def forward(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor) -> torch.Tensor:
        """Routed tokens ``x`` [N, D] with weights [N, K] and expert indices [N, K] -> [N, D]."""
        return self.dispatcher(x_ND, weights_NK, experts_NK, self)

    def forward_reference(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor) -> torch.Tensor:
        """Slow, obviously correct (:class:`~deepseek.nn.dispatch.LoopDispatch`): the reference of every path."""
        return LOOP(x_ND, weights_NK, experts_NK, self)

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, ffn_dim={self.ffn_dim}, dispatcher={self.dispatcher!r}"
