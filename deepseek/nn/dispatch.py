"""MoE dispatch: how the (token, expert) pairs reach their experts and how the results come back.

Legend: N tokens, D model width, E experts, K experts per token, P = N*K pairs, M rows of pairs grouped by expert.

A dispatcher is called as ``dispatcher(x_ND, weights_NK, experts_NK, compute) -> y_ND``: it decides which rows
each expert multiplies and adds the results back with the routing weights. The products are ``compute``'s
(:class:`deepseek.nn.experts.ExpertCompute`: the floating-point grouped product, or the int8/int4 products of
:class:`deepseek.nn.quantized.QuantizedExperts`), so each dispatch exists once for every kind of weights.

=======================  ==================================================================================
``SortedDispatch``       pairs sorted by expert on the device, one grouped product for all experts, weighted
                         scatter-add back (training, prefill). Work grows with N*K, not with E.
``HostGroupedDispatch``  the same grouping done on the host from the choices read back: CPU decoding, where a
                         device sort and a grouped kernel that walks every expert cost more than the arithmetic
``GatheredDispatch``     each pair gathers its expert's weights: compiled decoding (fixed shapes, no host read)
``LoopDispatch``         a loop over experts, each on the tokens that chose it: the slow, obviously correct
                         reference, and the export path (no host read, no ``torch._grouped_mm``)
``LocalDispatch``        the default: all experts on this device, one of the above per call (see the class)
=======================  ==================================================================================

Parallelism swaps in its own dispatcher from outside: expert parallelism an all-to-all
(:class:`deepseek.parallel.expert_parallel.AllToAllDispatch`, built from :func:`sort_by_expert` and
:func:`combine` like :class:`SortedDispatch`), tensor parallelism the sorted dispatch over each rank's slice of
the expert width (:class:`deepseek.parallel.tensor_parallel.TensorParallelDispatch`).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from deepseek.nn.experts import ExpertCompute

# At most this many (token, expert) pairs without gradients is decoding: the host-grouped or gathered dispatch.
FEW_PAIRS = 64


class Dispatcher(Protocol):
    def __call__(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor,
                 compute: "ExpertCompute") -> torch.Tensor:
        """``y_n = sum_k weights[n, k] * expert_{experts[n, k]}(x_n)``: [N, D] in ``compute.rows_dtype(x)``."""


def sort_by_expert(experts_NK: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pairs grouped by expert on the device: (pair of each row [P], rows per expert [E], group ends [E]).

    Stable, so within an expert the pairs keep token order. Counts and ends are int32, never read on the host.
    """
    flat = experts_NK.flatten()
    order = flat.argsort(stable=True)
    counts = torch.zeros(n_experts, dtype=torch.int32, device=flat.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    return order, counts, counts.cumsum(0, dtype=torch.int32)


def combine(y_PD: torch.Tensor, weights_P: torch.Tensor, token_of_pair: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Each pair's result times its routing weight, summed per token: [n_tokens, D] in ``y``'s dtype."""
    weights_P1 = weights_P.unsqueeze(-1).to(y_PD.dtype)
    # In place where nothing differentiates through it (decoding): one allocation fewer.
    y_PD = y_PD * weights_P1 if y_PD.requires_grad or weights_P1.requires_grad else y_PD.mul_(weights_P1)
    return y_PD.new_zeros(n_tokens, y_PD.shape[1]).index_add_(0, token_of_pair, y_PD)


class SortedDispatch:
    """Pairs sorted by expert on the device, one grouped product over all experts, weighted scatter-add back.

    No host read of the choices (the compute may read the group sizes: the quantized products do).
    """

    def __call__(self, x_ND, weights_NK, experts_NK, compute):
        order, counts_E, offsets_E = sort_by_expert(experts_NK, compute.n_experts)
        token_of_pair = order // experts_NK.shape[1]
        # index_select, not x[idx]: its backward is index_add, ~2x faster on CPU than indexing's accumulating index_put.
        y_sorted = compute.grouped(x_ND.index_select(0, token_of_pair).to(compute.rows_dtype(x_ND)), counts_E, offsets_E)
        return combine(y_sorted, weights_NK.flatten()[order], token_of_pair, x_ND.shape[0])


class HostGroupedDispatch:
    """Decoding on the CPU: the sorted dispatch with the grouping done on the host. Inference only.

    With a handful of tokens the device-side sort and the grouped matmul (whose CPU kernel walks every expert,
    empty or not, reading each offset back) cost more than the arithmetic; reading the choices on the host is
    free on CPU, and then only the chosen experts are visited.
    """

    def __call__(self, x_ND, weights_NK, experts_NK, compute):
        K = experts_NK.shape[1]
        choices = experts_NK.flatten().tolist()
        x_ND = x_ND.to(compute.rows_dtype(x_ND))
        if x_ND.shape[0] == 1:  # one token (batch-1 decoding): a weighted sum of its K experts, no sorting
            out = None
            for y, weight in zip(compute.spans(x_ND, [(e, 0, 1) for e in choices]), weights_NK[0].tolist()):
                y = y.mul_(weight)
                out = y if out is None else out.add_(y)
            return out
        order = sorted(range(len(choices)), key=choices.__getitem__)
        spans, start = [], 0
        for expert, pairs in itertools.groupby(order, key=choices.__getitem__):
            end = start + sum(1 for _ in pairs)
            spans.append((expert, start, end))
            start = end
        order_t = torch.tensor(order, device=x_ND.device)
        token_of_pair = order_t // K
        y_sorted = torch.cat(compute.spans(x_ND[token_of_pair], spans))
        return combine(y_sorted, weights_NK.flatten()[order_t], token_of_pair, x_ND.shape[0])


class GatheredDispatch:
    """Compiled decoding: each (token, expert) pair reads its expert's weights directly (``compute.pairs``).

    Written as gather + multiply + row sums (no host reads, fixed shapes), which inductor fuses into one loop
    over the chosen weights; in a compiled batch-1 step this is ~1.5x faster than eager (docs/benchmarks.md).
    Needs a compute that can gather its weights per pair (floating-point weights).
    """

    def __call__(self, x_ND, weights_NK, experts_NK, compute):
        N, K = experts_NK.shape
        dtype = compute.rows_dtype(x_ND)
        y_PD = compute.pairs(x_ND.to(dtype).repeat_interleave(K, dim=0), experts_NK.flatten())
        return (y_PD.view(N, K, -1) * weights_NK.view(N, K, 1).to(dtype)).sum(dim=1)


class LoopDispatch:
    """Slow, obviously correct: a loop over experts, each applied (``compute.expert``) to the tokens that chose it.

    Also the export path (torch.export, ONNX): each expert's rows come from ``nonzero`` (a data-dependent size in
    the graph, NonZero + Gather in ONNX) instead of host reads or ``torch._grouped_mm``, which has no ONNX form.
    Only the chosen (token, expert) pairs are computed; the graph holds E unrolled expert blocks per layer.
    """

    def __call__(self, x_ND, weights_NK, experts_NK, compute):
        out = torch.zeros_like(x_ND)
        for e in range(compute.n_experts):
            token_idx, slot = (experts_NK == e).nonzero(as_tuple=True)
            y = compute.expert(e, x_ND[token_idx])
            out = out.index_add(0, token_idx, y * weights_NK[token_idx, slot].unsqueeze(-1).to(y.dtype))
        return out


SORTED, HOST_GROUPED, GATHERED, LOOP = SortedDispatch(), HostGroupedDispatch(), GatheredDispatch(), LoopDispatch()


class LocalDispatch:
    """All experts on this device; per call the dispatch that suits the call:

    =============================================================  =======================
    exporting (torch.export, ONNX)                                 :class:`LoopDispatch`
    at most :data:`FEW_PAIRS` pairs, no gradient, compiling         :class:`GatheredDispatch`
    at most :data:`FEW_PAIRS` pairs, no gradient, on the CPU        :class:`HostGroupedDispatch`
    otherwise                                                      :class:`SortedDispatch`
    =============================================================  =======================

    ``gathered=False`` for computes that cannot gather weights per pair (quantized): compiled decoding then
    takes the host-grouped dispatch (a graph break) like eager decoding.
    """

    def __init__(self, gathered: bool = True):
        self.gathered = gathered

    def __call__(self, x_ND, weights_NK, experts_NK, compute):
        if torch.compiler.is_exporting():
            return LOOP(x_ND, weights_NK, experts_NK, compute)
        if x_ND.shape[0] * experts_NK.shape[1] <= FEW_PAIRS and not torch.is_grad_enabled():
            if self.gathered and torch.compiler.is_compiling():
                return GATHERED(x_ND, weights_NK, experts_NK, compute)
            if x_ND.device.type == "cpu":
                return HOST_GROUPED(x_ND, weights_NK, experts_NK, compute)
        return SORTED(x_ND, weights_NK, experts_NK, compute)

    def __repr__(self) -> str:
        return f"LocalDispatch(gathered={self.gathered})"
