"""SwiGLU feed-forward (Shazeer, 2020): ``down(silu(gate(x)) * up(x))``."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class _SwiGLUOfFused(torch.autograd.Function):
    """``silu(gate) * up`` of a fused [M, 2F] product (gate columns first) whose gradient is written straight into
    one [M, 2F] tensor: autograd's version ends its backward with a cat of the two halves' gradients, a full extra
    pass over the largest activation of an MoE layer (~4 ms per layer at M = 4096, F = 512 on 2 cores)."""

    @staticmethod
    def forward(ctx, gate_up_M2F: torch.Tensor, ffn_dim: int) -> torch.Tensor:
        gate, up = gate_up_M2F[:, :ffn_dim], gate_up_M2F[:, ffn_dim:]
        silu_gate = F.silu(gate)
        ctx.save_for_backward(gate_up_M2F, silu_gate)
        ctx.ffn_dim = ffn_dim
        ctx.in_place = gate_up_M2F.grad_fn is not None and not gate_up_M2F._is_view()  # never a user's tensor
        return silu_gate * up

    @staticmethod
    def backward(ctx, grad_MF: torch.Tensor):
        # Formed in place in the saved product (an intermediate nothing reads after this) where it may be: a fresh
        # [M, 2F] buffer costs its page faults on every step. A second backward through the same graph
        # (retain_graph) then fails autograd's version check with a clear message instead of using stale values.
        gate_up_M2F, silu_gate = ctx.saved_tensors
        if not ctx.in_place:
            gate_up_M2F = gate_up_M2F.clone()
        gate, up = gate_up_M2F[:, :ctx.ffn_dim], gate_up_M2F[:, ctx.ffn_dim:]
        up.mul_(grad_MF)  # up half := d hidden * up
        torch.ops.aten.silu_backward.grad_input(up, gate, grad_input=gate)  # gate half := d gate
        torch.mul(grad_MF, silu_gate, out=up)  # up half := d up
        return gate_up_M2F, None


def swiglu_of_fused(gate_up_M2F: torch.Tensor, ffn_dim: int) -> torch.Tensor:
    """``silu(gate) * up`` where ``gate_up`` [M, 2F] holds the gate columns first: [M, F]."""
    # Eager only: inductor fuses the plain form itself (and dynamo warns on tracing an autograd.Function).
    if (torch.is_grad_enabled() and gate_up_M2F.requires_grad and gate_up_M2F.dim() == 2
            and not torch.compiler.is_compiling()):
        return _SwiGLUOfFused.apply(gate_up_M2F, ffn_dim)
    return F.silu(gate_up_M2F[..., :ffn_dim]) * gate_up_M2F[..., ffn_dim:]


class SwiGLU(nn.Module):
    """A dense SwiGLU MLP; used for the dense layers and the shared experts."""

    def __init__(self, d_model: int, ffn_dim: int):
        super().__init__()
        self.gate = nn.Linear(d_model, ffn_dim, bias=False)
        self.up = nn.Linear(d_model, ffn_dim, bias=False)
        self.down = nn.Linear(ffn_dim, d_model, bias=False)
        # Quantization replaces gate and up by one product (deepseek.nn.quantized): one activation pass, not two.
        self.gate_up: Optional[nn.Module] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(F.silu(self.gate(x)) * self.up(x))
