"""The grouped expert product: rows ``offsets[e-1]:offsets[e]`` times expert ``e``'s weight, all experts in one call.

Legend: M rows (sorted by expert), I input width, O output width, E experts.
"""

from __future__ import annotations

import torch

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")

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
