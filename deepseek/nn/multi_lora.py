"""Many LoRA adapters on one frozen linear, chosen per row: one batch mixes rows of different adapters (serving).

Legend: B rows, T tokens per row, I/O the linear's input/output width, K adapters, R the largest adapter rank.

:class:`MultiLoRALinear` keeps the base ``nn.Linear`` and K adapters stacked as buffers, ``lora_A`` [K, R, I] and
``lora_B`` [K, O, R] (a smaller rank is zero-padded, which adds exact zeros; an adapter that does not target this
module has B = 0), with ``scaling`` [K]. Before a forward the caller sets each row's adapter index
(:func:`row_adapters`; −1 = the base alone): ``y_b = base(x_b) + scaling[k_b] * B[k_b] (A[k_b] x_b)``.

The mixing is the gathered low-rank product (vLLM's BGMV/"punica" shape): the base GEMM runs once over every
token, then each row's A and B are gathered ([B, R, I], [B, O, R]) and applied by two ``bmm``; base rows get
their product masked to zero. The other way — sort rows by adapter and run one product per adapter group (SGMV,
or our grouped matmul over adapter groups) — reads each adapter once instead of once per row; it pays off when
many rows share few adapters at large R·I, and needs the per-group counts on the host. At decode sizes the gather
is a few KB per row and keeps the hot path free of host syncs.

Only plain linears (the attention projections) are served this way; routed experts and the head are not (the
head's product is read as ``weight`` by the model, and per-row expert adapters need (adapter, expert) groups).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
from torch import nn


class MultiLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (``base_layer``) with K named adapters, applied per row: [B, T, I] -> [B, T, O].

    ``names`` the adapters in index order; ``lora_A`` [K, R, I], ``lora_B`` [K, O, R], ``scaling`` [K] (buffers:
    serving never trains them). ``row_ids`` [B] (long, −1 = base) is set by :func:`row_adapters`; None computes
    the base alone.
    """

    def __init__(self, base_layer: nn.Linear, names: Sequence[str], rank: int):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.names = tuple(names)
        weight = base_layer.weight
        kw = {"device": weight.device, "dtype": weight.dtype}
        K = len(self.names)
        self.register_buffer("lora_A", torch.zeros(K, rank, base_layer.in_features, **kw))
        self.register_buffer("lora_B", torch.zeros(K, base_layer.out_features, rank, **kw))
        self.register_buffer("scaling", torch.zeros(K, **kw))
        self.row_ids: Optional[torch.Tensor] = None

    @torch.no_grad()
    def set_adapter(self, index: int, a_RI: torch.Tensor, b_OR: torch.Tensor, scaling: float) -> None:
        """Adapter ``index`` := (A [r, I], B [O, r], scaling), r <= R (the rest of the rank stays zero)."""
        r = a_RI.shape[0]
        self.lora_A[index].zero_()
        self.lora_B[index].zero_()
        self.lora_A[index, :r] = a_RI
        self.lora_B[index, :, :r] = b_OR
        self.scaling[index] = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        ids_B = self.row_ids
        if ids_B is None:
            return y
        if ids_B.shape[0] != x.shape[0]:
            raise ValueError(f"row adapters set for {ids_B.shape[0]} rows, input has {x.shape[0]}")
        x_BTI = x.reshape(x.shape[0], -1, x.shape[-1])
        k_B = ids_B.clamp(min=0)
        dtype = x.dtype
        a_BRI = self.lora_A[k_B].to(dtype)
        b_BOR = self.lora_B[k_B].to(dtype)
        scale_B = torch.where(ids_B >= 0, self.scaling[k_B], 0).to(dtype)
        inner_BTR = torch.bmm(x_BTI, a_BRI.transpose(1, 2))
        low_BTO = torch.bmm(inner_BTR, b_BOR.transpose(1, 2)) * scale_B[:, None, None]
        return y + low_BTO.reshape(y.shape).to(y.dtype)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The slow, obvious path (one row at a time, F.linear): for tests of :meth:`forward`."""
        y = self.base_layer(x)
        if self.row_ids is None:
            return y
        rows = []
        for b, k in enumerate(self.row_ids.tolist()):
            if k < 0:
                rows.append(y[b])
            else:
                low = nn.functional.linear(nn.functional.linear(x[b], self.lora_A[k]), self.lora_B[k])
                rows.append(y[b] + low * self.scaling[k])
        return torch.stack(rows)

    def extra_repr(self) -> str:
        return f"adapters={list(self.names)}, r={self.lora_A.shape[1]}"


def multi_lora_modules(model: nn.Module) -> list[MultiLoRALinear]:
    return [m for m in model.modules() if isinstance(m, MultiLoRALinear)]


def adapter_names(model: nn.Module) -> tuple[str, ...]:
    """The names of the adapters ``model`` serves per row, in index order (empty without any)."""
    modules = multi_lora_modules(model)
    return modules[0].names if modules else ()


@contextlib.contextmanager
def row_adapters(model: nn.Module, ids_B: Optional[torch.Tensor]) -> Iterator[nn.Module]:
    """Within the block, row b of ``model``'s forwards uses adapter ``ids_B[b]`` (−1 = base); then base again."""
    modules = multi_lora_modules(model)
    for m in modules:
        m.row_ids = ids_B
    try:
        yield model
    finally:
        for m in modules:
            m.row_ids = None
