"""Many LoRA adapters on one frozen linear, chosen per row: one batch mixes rows of different adapters (serving).

Legend: B rows, T tokens per row, I/O the linear's input/output width, K adapters, R the largest adapter rank.

:class:`MultiLoRALinear` keeps the base ``nn.Linear`` and K adapters stacked as buffers, ``lora_A`` [K, R, I] and
``lora_B`` [K, O, R] (a smaller rank is zero-padded, which adds exact zeros; an adapter that does not target this
module has B = 0), with ``scaling`` [K]. Before a forward the caller sets each row's adapter index
(:func:`row_adapters`; −1 = the base alone): ``y_b = base(x_b) + scaling[k_b] * B[k_b] (A[k_b] x_b)``. The input
is [B, T, I], or [B·T, I] with the rows' tokens flattened row-major (what an MoE layer hands its shared expert).

Mixing rows of different adapters in one forward — three ways, measured by ``benchmarks/bench_multi_lora.py``
(x86 CPU, 1 thread, fp32, one D×D linear, K adapters of rank R, best of 5 interleaved rounds, µs):

    case                          base   gathered  grouped  stacked
    D=1024 decode 16×1, K=4 R=16   514     1553      738      718
    D=1024 decode 16×1, K=2 R=16   523      928      652      646
    D=2048 decode 16×1, K=4 R=64  2141     5870     2604     3014
    D=1024 prefill 1×256, K=1     3311     3793     3523     3693
    D=1024 4×64, K=4 R=16         3321     4004     4090     4036

* gathered (vLLM's BGMV shape, :meth:`MultiLoRALinear.gathered`): each row's A and B gathered, two ``bmm``. It
  copies R·(I+O) weights per row: 2-3x the base at decode. Rejected.
* grouped (SGMV-like: rows sorted by adapter, one product per adapter group): reads each adapter once, but the
  groups are sized on the host (a sync per layer) and the shapes change with the batch's mix.
* stacked and masked (:meth:`MultiLoRALinear.forward`, used): all rows through all adapters' A at once, each
  row's columns of other adapters zeroed, then all B at once. Fixed shapes, no sync, each adapter read once; its
  low-rank work grows with K·R (every row pays all adapters' shrink), so past a few dozen adapters the grouped
  product would win. B is stored [O, K, R] so that its [O, K·R] matrix is a view (the first version copied it
  from [K, O, R] every call), the row mask is computed once per forward for all layers (:func:`row_adapters`),
  and the B product accumulates into the base's output (``addmm_``): at the quickstart's width (D=192, decode
  16×1, K=4, R=16; same Xeon, shared, 1 thread, best of 15) 173 → 134 µs against the base's 22 µs, prefill
  1×128 482 → 308 µs (base 72). A continuous batch whose rows all use the base skips the low-rank products.

Only plain linears (attention, dense and shared-expert projections) are served this way; routed experts and the
head are not (the head's product is read as ``weight`` by the model, and per-row expert adapters need (adapter,
expert) groups).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
from torch import nn


class MultiLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (``base_layer``) with K named adapters, applied per row: [B, T, I] -> [B, T, O]
    (or [B·T, I] -> [B·T, O]).

    ``names`` the adapters in index order ("" = an empty slot); ``lora_A`` [K, R, I], ``lora_B`` [K, O, R],
    ``scaling`` [K] (buffers: serving never trains them; ``lora_B`` is a view of the buffer ``lora_B_OKR``
    [O, K, R], the layout whose [O, K·R] reshape the forward multiplies without a copy). ``row_ids`` [B] (long,
    −1 = base) is set by :func:`row_adapters`; None computes the base alone.
    """

    def __init__(self, base_layer: nn.Linear, names: Sequence[str], rank: int):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.names = tuple(names)
        weight = base_layer.weight
        kw = {"device": weight.device, "dtype": weight.dtype}
        K = len(self.names)
        self.register_buffer("lora_A", torch.zeros(K, rank, base_layer.in_features, **kw))
        self.register_buffer("lora_B_OKR", torch.zeros(base_layer.out_features, K, rank, **kw))
        self.register_buffer("scaling", torch.zeros(K, **kw))
        self.row_ids = None

    @property
    def lora_B(self) -> torch.Tensor:
        """[K, O, R]: adapter k's B is ``lora_B[k]`` (a view: writes go to ``lora_B_OKR``)."""
        return self.lora_B_OKR.permute(1, 0, 2)

    @property
    def row_ids(self) -> Optional[torch.Tensor]:
        return self._row_ids

    @row_ids.setter
    def row_ids(self, ids_B: Optional[torch.Tensor]) -> None:
        self._row_ids = ids_B
        self.row_onehot_BK: Optional[torch.Tensor] = None  # row_adapters shares one across the model's layers

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
        """The stacked, masked product: every row through all K adapters' A at once ([B, T, K·R]), each row's
        columns of other adapters zeroed (its own scaled), then all B at once, accumulated into the base's output.
        Two GEMMs of fixed shape, no host sync, no weight copies, each adapter's weights read once."""
        y = self.base_layer(x)
        ids_B = self.row_ids
        if ids_B is None:
            return y
        K, R, I = self.lora_A.shape
        B, O, dtype = ids_B.shape[0], y.shape[-1], x.dtype
        x_BTI = _rows(x, B)
        onehot_BK = self.row_onehot_BK if self.row_onehot_BK is not None else row_onehot(ids_B, K)
        # A row's own adapter's columns carry its scaling, the others 0 (−1 matches none: the base alone).
        scale_BK = onehot_BK.to(dtype) * self.scaling.to(dtype)
        a_QI = self.lora_A.reshape(K * R, I).to(dtype)  # Q = K·R, adapter-major
        inner_BTKR = (x_BTI @ a_QI.t()).view(B, -1, K, R) * scale_BK[:, None, :, None]
        b_OQ = self.lora_B_OKR.reshape(O, K * R).to(y.dtype)
        y.view(-1, O).addmm_(inner_BTKR.reshape(-1, K * R).to(y.dtype), b_OQ.t())
        return y

    def gathered(self, x: torch.Tensor) -> torch.Tensor:
        """The gathered product (vLLM's BGMV shape): each row's A and B gathered, two ``bmm`` (kept to measure
        against :meth:`forward`, see the module docstring)."""
        y = self.base_layer(x)
        ids_B = self.row_ids
        x_BTI = _rows(x, ids_B.shape[0])
        k_B = ids_B.clamp(min=0)
        a_BRI, b_BOR = self.lora_A[k_B].to(x.dtype), self.lora_B[k_B].to(x.dtype)
        scale_B = torch.where(ids_B >= 0, self.scaling[k_B], 0).to(x.dtype)
        low_BTO = torch.bmm(torch.bmm(x_BTI, a_BRI.transpose(1, 2)), b_BOR.transpose(1, 2)) * scale_B[:, None, None]
        return y + low_BTO.reshape(y.shape).to(y.dtype)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The slow, obvious path (one row at a time, F.linear): for tests of :meth:`forward`."""
        y = self.base_layer(x)
        if self.row_ids is None:
            return y
        x_BTI = _rows(x, self.row_ids.shape[0])
        y_BTO = y.reshape(x_BTI.shape[0], x_BTI.shape[1], -1)
        rows = []
        for b, k in enumerate(self.row_ids.tolist()):
            if k < 0:
                rows.append(y_BTO[b])
            else:
                low = nn.functional.linear(nn.functional.linear(x_BTI[b], self.lora_A[k]), self.lora_B[k])
                rows.append(y_BTO[b] + low * self.scaling[k])
        return torch.stack(rows).reshape(y.shape)

    def extra_repr(self) -> str:
        return f"adapters={list(self.names)}, r={self.lora_A.shape[1]}"


def _rows(x: torch.Tensor, n_rows: int) -> torch.Tensor:
    """``x`` [B, T, I] (or [B, I]), or [B·T, I] flattened row-major, as [B, T, I] for ``n_rows`` = B rows."""
    if x.shape[0] != n_rows and not (x.dim() == 2 and x.shape[0] % n_rows == 0):
        raise ValueError(f"row adapters set for {n_rows} rows, input has {x.shape[0]}")
    return x.reshape(n_rows, -1, x.shape[-1])


def row_onehot(ids_B: torch.Tensor, K: int) -> torch.Tensor:
    """[B, K] float: 1 where row b uses adapter k (a row of −1, the base, is all zeros)."""
    return (ids_B[:, None] == torch.arange(K, device=ids_B.device)).float()


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
    onehot_BK = None if ids_B is None or not modules else row_onehot(ids_B, len(modules[0].names))
    for m in modules:
        m.row_ids = ids_B
        m.row_onehot_BK = onehot_BK  # computed once for every layer
    try:
        yield model
    finally:
        for m in modules:
            m.row_ids = None
