"""SwiGLU feed-forward (Shazeer, 2020): ``down(silu(gate(x)) * up(x))``."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


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
