"""LoRA (Hu et al., 2021): trainable low-rank pairs added to frozen linears and to the routed experts' 3-D weights.

Legend: N tokens, M rows grouped by expert, P (token, expert) pairs, D model width, F expert width, E experts,
I/O a linear's input/output width, R the adapter rank.

``W x`` becomes ``W x + s * B (A dropout(x))`` with ``A`` [R, I] (Kaiming-uniform, as PEFT) and ``B`` [O, R] (zeros,
so an adapted model starts exactly at its base), ``s = alpha / R`` (``alpha / sqrt(R)`` with rsLoRA). Routed experts
get one pair per expert and per projection — gate_up: A [E, R, D], B [E, 2F, R]; down: A [E, R, F], B [E, D, R] —
and :class:`LoRAExperts` is an :class:`~deepseek.nn.experts.ExpertCompute`, so every dispatcher runs it unchanged;
its grouped path adds the low-rank products through the same grouped matmul over the same groups.

QLoRA (Dettmers et al., 2023): the base may be quantized (:mod:`deepseek.nn.quantized`, as ``ds compress`` writes
it): a :class:`~deepseek.nn.quantized.QuantizedLinear` or :class:`~deepseek.nn.quantized.QuantizedExperts` is the
frozen base and the fp32 adapters add their low-rank term to its output. The base's forward runs its kernel
unchanged (with B = 0 the logits are the quantized model's exactly); its backward w.r.t. the input is the
straight-through ``grad @ W_dequantized`` (:class:`~deepseek.nn.quantized.StraightThroughProduct`). A quantized
model fuses attention's q, k, v into one ``attn.qkv`` product, so target ``"attn.qkv"`` / ``"attn.*"`` there.
:func:`merge_lora` refuses a quantized base: folding the adapters in would re-quantize them away.

Modules are chosen by name with shell-style patterns (:mod:`fnmatch`, case-sensitive) matched against the full
module name or any dotted suffix of it: ``"q"`` matches ``blocks.0.attn.q``, ``"attn.*"`` every attention
projection, ``"blocks.1.ffn.experts"`` one layer's routed experts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from deepseek.nn.experts import GroupedExperts, Span, span_rows
from deepseek.nn.grouped_mm import grouped_matmul
from deepseek.nn.quantized import QuantizedExperts, QuantizedLinear, _cpu_kernel

ATTENTION = ("attn.q", "attn.k", "attn.v", "attn.o")


@dataclass(frozen=True)
class LoRAConfig:
    """Which modules get adapters and how large: PEFT's semantics (``scaling = alpha / r``, rsLoRA ``alpha / sqrt(r)``).

    ``alpha`` None means ``alpha = r`` (scaling 1). ``target_modules``: :mod:`fnmatch` patterns on module names
    (see the module docstring); the adaptable modules are ``nn.Linear`` and the routed experts (GroupedExperts),
    and their quantized forms (QuantizedLinear, QuantizedExperts: QLoRA).
    """

    r: int = 64
    alpha: Optional[float] = None
    dropout: float = 0.0
    rslora: bool = False
    target_modules: tuple[str, ...] = ATTENTION

    def __post_init__(self):
        if isinstance(self.target_modules, str) or not isinstance(self.target_modules, (list, tuple)):
            raise ValueError(f"LoRAConfig.target_modules must be a list of name patterns, got {self.target_modules!r}")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRAConfig.r must be a positive integer, got {self.r!r}")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                                       or not self.alpha > 0):
            raise ValueError(f"LoRAConfig.alpha must be a positive number (or None for alpha = r), got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRAConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        if not isinstance(self.rslora, bool):
            raise ValueError(f"LoRAConfig.rslora must be true or false, got {self.rslora!r}")
        if not self.target_modules or not all(isinstance(p, str) and p for p in self.target_modules):
            raise ValueError(f"LoRAConfig.target_modules must be non-empty name patterns, got {self.target_modules!r}")

    @classmethod
    def from_dict(cls, data: dict) -> "LoRAConfig":
        """From a mapping (a YAML/JSON section); an unknown key is a ValueError listing the valid ones."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ValueError(f"unknown LoRAConfig key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")
        return cls(**data)

    @property
    def scaling(self) -> float:
        alpha = self.r if self.alpha is None else self.alpha
        return alpha / math.sqrt(self.r) if self.rslora else alpha / self.r


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    # Like PEFT, adapters of a half-precision base are kept in fp32 (their updates are small); products run in
    # the rows' dtype.
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


def _adapter_kwargs(base: nn.Module) -> dict:
    """Device and dtype of the adapters of ``base``: fp32 on a quantized base (its weights are integers)."""
    if isinstance(base, QuantizedLinear):
        return {"device": base.weight_q.scale.device, "dtype": torch.float32}
    if isinstance(base, QuantizedExperts):
        return {"device": base.gate_up[0].scale.device, "dtype": torch.float32}
    weight = base.weight if isinstance(base, nn.Linear) else base.gate_up
    return {"device": weight.device, "dtype": _adapter_dtype(weight)}


def _init_a(a: torch.Tensor, in_features: int) -> None:
    """PEFT's ``kaiming_uniform_(a=sqrt(5))`` of each [R, I] matrix: uniform in +-1/sqrt(I) (also per expert)."""
    bound = 1.0 / math.sqrt(in_features)
    nn.init.uniform_(a, -bound, bound)


class LoRALinear(nn.Module):
    """An ``nn.Linear`` or :class:`~deepseek.nn.quantized.QuantizedLinear` (kept as ``base_layer``, frozen) plus
    ``scaling * B (A dropout(x))``: [..., I] -> [..., O].

    ``lora_A`` [R, I], ``lora_B`` [O, R]. With ``enabled`` False (see :func:`disable_adapters`) it is the base exactly.
    """

    def __init__(self, base_layer: Union[nn.Linear, QuantizedLinear], config: LoRAConfig):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.scaling, self.enabled = config.scaling, True
        self.lora_config = config  # r, alpha and rsLoRA as given: an adapter file keeps them, not only the scaling
        kw = _adapter_kwargs(base_layer)
        self.lora_A = nn.Parameter(torch.empty(config.r, base_layer.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, config.r, **kw))
        _init_a(self.lora_A.data, base_layer.in_features)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self.enabled:
            return y
        low_in = F.linear(self.dropout(x), self.lora_A.to(x.dtype))
        if low_in.dtype == y.dtype:
            # y + scaling * (low_in @ B^T) as one addmm: the scale and the sum happen inside the product instead of
            # as two passes over [N, O] forward and one backward (~2-3 % of an fp32 LoRA step on 2 cores).
            out = torch.addmm(y.reshape(-1, y.shape[-1]), low_in.reshape(-1, low_in.shape[-1]),
                              self.lora_B.to(y.dtype).t(), alpha=self.scaling)
            return out.view(y.shape)
        low = F.linear(low_in, self.lora_B.to(x.dtype))
        return y + (low * self.scaling).to(y.dtype)

    @property
    def quantized(self) -> bool:
        return isinstance(self.base_layer, QuantizedLinear)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight [O, I], differentiable into the adapters (no dropout): for code that reads a
        linear's weight instead of calling it (the model's head does, for its fused loss and decoding). On a
        quantized base this is the dequantized fp32 weight (built per call)."""
        weight = self.base_layer.weight_q.dequantize() if self.quantized else self.base_layer.weight
        if not self.enabled:
            return weight
        delta = (self.lora_B.to(weight.dtype) @ self.lora_A.to(weight.dtype)) * self.scaling
        return weight + delta

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B A`` [O, I] in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """The base weight with the adapter folded in, in the base's dtype: [O, I]."""
        _refuse_quantized_merge(self)
        weight = self.base_layer.weight
        return (weight.float() + self.delta_weight()).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"r={self.lora_A.shape[0]}, scaling={self.scaling:g}, enabled={self.enabled}"


class LoRAExperts(nn.Module):
    """Routed experts (a :class:`~deepseek.nn.experts.GroupedExperts` or
    :class:`~deepseek.nn.quantized.QuantizedExperts` kept as ``base_layer``, frozen) with one low-rank pair per
    expert on each projection; the :class:`~deepseek.nn.experts.ExpertCompute` its dispatcher (the base's, so a
    dispatcher swapped on the base applies here too) calls.

    The base enters only through its per-expert projections (:meth:`_projections`): float weights as ``F.linear``
    (and, in :meth:`grouped`, as grouped matmuls), quantized ones as their kernel's product (rows in fp32, one
    host read of the group sizes, as QuantizedExperts itself).

    ``lora_gate_up_A`` [E, R, D], ``lora_gate_up_B`` [E, 2F, R], ``lora_down_A`` [E, R, F], ``lora_down_B`` [E, D, R].
    Dropout applies to the rows entering each ``A``. Deliberately not a GroupedExperts and without ``gate_up`` /
    ``down`` attributes: code that reads the base weights directly (expert and tensor parallelism build their own
    products from them) fails loudly instead of silently dropping the adapters.
    """

    def __init__(self, base_layer: Union[GroupedExperts, QuantizedExperts], config: LoRAConfig):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.n_experts, self.ffn_dim = base_layer.n_experts, base_layer.ffn_dim
        self.scaling, self.enabled = config.scaling, True
        self.lora_config = config  # as LoRALinear's
        if isinstance(base_layer, QuantizedExperts):
            E, F2, D = base_layer.n_experts, 2 * base_layer.ffn_dim, base_layer.d_model
        else:
            E, F2, D = base_layer.gate_up.shape
        R = config.r
        kw = _adapter_kwargs(base_layer)
        self.lora_gate_up_A = nn.Parameter(torch.empty(E, R, D, **kw))
        self.lora_gate_up_B = nn.Parameter(torch.zeros(E, F2, R, **kw))
        self.lora_down_A = nn.Parameter(torch.empty(E, R, self.ffn_dim, **kw))
        self.lora_down_B = nn.Parameter(torch.zeros(E, D, R, **kw))
        _init_a(self.lora_gate_up_A.data, D)
        _init_a(self.lora_down_A.data, self.ffn_dim)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor) -> torch.Tensor:
        """Routed tokens ``x`` [N, D] with weights [N, K] and expert indices [N, K] -> [N, D]."""
        if not self.enabled:
            return self.base_layer(x_ND, weights_NK, experts_NK)
        y_ND = self.base_layer.dispatcher(x_ND, weights_NK, experts_NK, self)
        return y_ND.to(x_ND.dtype) if self.quantized else y_ND  # quantized products are fp32, as QuantizedExperts

    @property
    def quantized(self) -> bool:
        return isinstance(self.base_layer, QuantizedExperts)

    def merged_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate_up [E, 2F, D], down [E, D, F])`` with each expert's adapters folded in, in the base's dtype."""
        _refuse_quantized_merge(self)
        gate_up, down = self.base_layer.gate_up, self.base_layer.down
        delta_gate_up = torch.bmm(self.lora_gate_up_B.float(), self.lora_gate_up_A.float()) * self.scaling
        delta_down = torch.bmm(self.lora_down_B.float(), self.lora_down_A.float()) * self.scaling
        return (gate_up.float() + delta_gate_up).to(gate_up.dtype), (down.float() + delta_down).to(down.dtype)

    # -- ExpertCompute ------------------------------------------------------------------------------------------

    def rows_dtype(self, x_ND: torch.Tensor) -> torch.dtype:
        return self.base_layer.rows_dtype(x_ND)

    def _projections(self, e: int, x_MD: torch.Tensor):
        """Expert e's base products ``(gate_up: [M, D] -> [M, 2F], down: [M, F] -> [M, D])`` on rows like ``x``."""
        base, dtype = self.base_layer, x_MD.dtype
        if self.quantized:  # the kernel's value, straight-through gradient (StraightThroughProduct)
            kernel = _cpu_kernel(base, x_MD)
            return (lambda rows: base.gate_up[e].product(rows, kernel)), (lambda h: base.down[e].product(h, kernel))
        return (lambda rows: F.linear(rows, base.gate_up[e].to(dtype))), (lambda h: F.linear(h, base.down[e].to(dtype)))

    def grouped(self, x_MD: torch.Tensor, counts_E: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        """Base and low-rank products as grouped matmuls over the same groups (no loop over experts); on a
        quantized base, each expert that has rows in turn (one host read of the group sizes)."""
        if self.quantized:
            out, start = [], 0
            for e, count in enumerate(counts_E.tolist()):
                if count:
                    out.append(self.expert(e, x_MD[start:start + count]))
                    start += count
            return torch.cat(out) if out else x_MD + 0.0 * sum(w.sum() for w in self.adapters()).to(x_MD.dtype)
        dtype, base = x_MD.dtype, self.base_layer
        adapters = (self.lora_gate_up_A, self.lora_gate_up_B, self.lora_down_A, self.lora_down_B)
        if x_MD.shape[0] == 0:  # keep every weight in the graph: zero gradients, not None (as GroupedProduct)
            return x_MD + 0.0 * sum(w.sum() for w in (base.gate_up, base.down, *adapters)).to(dtype)
        # No bf16 row bucketing here (GroupedProduct's oneDNN kernel-cache workaround on CPU): a speed matter only.

        def low_rank(rows_MI, a_ERI, b_EOR):
            inner_MR = grouped_matmul(self.dropout(rows_MI), a_ERI.to(dtype).transpose(1, 2), offsets_E)
            return grouped_matmul(inner_MR, b_EOR.to(dtype).transpose(1, 2), offsets_E) * self.scaling

        gate_up_MF = grouped_matmul(x_MD, base.gate_up.to(dtype).transpose(1, 2), offsets_E)
        gate_up_MF = gate_up_MF + low_rank(x_MD, self.lora_gate_up_A, self.lora_gate_up_B)
        gate, up = gate_up_MF.split(self.ffn_dim, dim=-1)
        hidden_MF = F.silu(gate) * up
        y_MD = grouped_matmul(hidden_MF, base.down.to(dtype).transpose(1, 2), offsets_E)
        return y_MD + low_rank(hidden_MF, self.lora_down_A, self.lora_down_B)

    def expert(self, e: int, x_MD: torch.Tensor) -> torch.Tensor:
        """Expert e with its adapters, in plain differentiable ops (the loop dispatch, export): [M, D]."""
        x_MD = x_MD.float() if self.quantized else x_MD
        dtype = x_MD.dtype
        gate_up_of, down_of = self._projections(e, x_MD)

        def low_rank(rows, a, b):
            return F.linear(F.linear(self.dropout(rows), a[e].to(dtype)), b[e].to(dtype)) * self.scaling

        gate_up = gate_up_of(x_MD) + low_rank(x_MD, self.lora_gate_up_A, self.lora_gate_up_B)
        gate, up = gate_up.split(self.ffn_dim, dim=-1)
        hidden = F.silu(gate) * up
        return down_of(hidden) + low_rank(hidden, self.lora_down_A, self.lora_down_B)

    def adapters(self) -> tuple[torch.Tensor, ...]:
        return (self.lora_gate_up_A, self.lora_gate_up_B, self.lora_down_A, self.lora_down_B)

    def spans(self, x_MD: torch.Tensor, spans: list[Span]) -> list[torch.Tensor]:
        """Inference only: each chosen expert on its rows (per-expert math; decoding visits few experts)."""
        return [self.expert(e, span_rows(x_MD, a, b)) for e, a, b in spans]

    def pairs(self, x_PD: torch.Tensor, expert_of_pair: torch.Tensor) -> torch.Tensor:
        """Each pair's expert on its row, base and adapter weights gathered per pair (compiled decoding): [P, D].
        Float bases only: a quantized base's dispatcher groups on the host instead (``gathered=False``)."""
        dtype, base = x_PD.dtype, self.base_layer

        def gathered(w_EOI, rows_PI):
            return (w_EOI[expert_of_pair].to(dtype) * rows_PI.unsqueeze(1)).sum(dim=-1)

        def low_rank(rows_PI, a, b):
            return gathered(b, gathered(a, self.dropout(rows_PI))) * self.scaling

        gate_up_PF = gathered(base.gate_up, x_PD) + low_rank(x_PD, self.lora_gate_up_A, self.lora_gate_up_B)
        hidden_PF = F.silu(gate_up_PF[:, :self.ffn_dim]) * gate_up_PF[:, self.ffn_dim:]
        return gathered(base.down, hidden_PF) + low_rank(hidden_PF, self.lora_down_A, self.lora_down_B)

    def extra_repr(self) -> str:
        return f"r={self.lora_gate_up_A.shape[1]}, scaling={self.scaling:g}, enabled={self.enabled}"


LORA_MODULES = (LoRALinear, LoRAExperts)


@dataclass
class LoRASummary:
    """What :func:`apply_lora` did: the adapted modules' names, trainable (adapter) and total parameter counts."""

    modules: list[str]
    trainable_parameters: int
    total_parameters: int

    def __str__(self) -> str:
        share = 100 * self.trainable_parameters / max(self.total_parameters, 1)
        return (f"LoRA on {len(self.modules)} modules: {self.trainable_parameters:,} trainable of "
                f"{self.total_parameters:,} parameters ({share:.2f}%)")


def _refuse_quantized_merge(module: nn.Module) -> None:
    if module.quantized:
        raise ValueError(f"cannot merge LoRA adapters into a quantized base ({module.base_layer.__class__.__name__}): "
                         "the merged weight would be re-quantized and the adapters' small update rounded away. Merge "
                         "onto the floating-point model instead (apply lora_state_dict to the uncompressed model, "
                         "merge_lora, then `ds compress` it), or keep the adapters unmerged")


def _matches(name: str, pattern: str) -> bool:
    return fnmatchcase(name, pattern) or fnmatchcase(name, "*." + pattern)


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_lora(model: nn.Module, config: LoRAConfig) -> LoRASummary:
    """Adds adapters, in place, to every ``nn.Linear`` and routed-experts module whose name matches a pattern of
    ``config.target_modules``, and freezes every other parameter of ``model``.

    Raises ValueError if a pattern matches no adaptable module (listing the adaptable names), or if ``model``
    already has adapters.
    """
    if any(isinstance(m, LORA_MODULES) for m in model.modules()):
        raise ValueError("model already has LoRA adapters (merge_lora them first)")
    adaptable = [(name, m) for name, m in model.named_modules()
                 if name and isinstance(m, (nn.Linear, GroupedExperts, QuantizedLinear, QuantizedExperts))]
    targets: dict[str, nn.Module] = {}
    for pattern in config.target_modules:
        hits = [(name, m) for name, m in adaptable if _matches(name, pattern)]
        if not hits:
            shown = ", ".join(name for name, _ in adaptable[:12]) + (", ..." if len(adaptable) > 12 else "")
            raise ValueError(f"LoRAConfig.target_modules pattern {pattern!r} matches no nn.Linear or routed-experts "
                             f"module (quantized or not); adaptable modules: {shown}")
        targets.update(hits)
    model.requires_grad_(False)
    for name, module in targets.items():
        experts = isinstance(module, (GroupedExperts, QuantizedExperts))
        wrapper = LoRAExperts(module, config) if experts else LoRALinear(module, config)
        _set_child(model, name, wrapper)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return LoRASummary(sorted(targets), trainable, sum(p.numel() for p in model.parameters()))


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every adapter into its base weights and puts the plain modules back, in place; returns ``model``.

    The base parameters stay frozen (``model.requires_grad_(True)`` to train them all). A quantized base (QLoRA)
    is a ValueError, raised before anything is changed: see :func:`_refuse_quantized_merge`.
    """
    if isinstance(model, LORA_MODULES):  # nothing to put the plain module back into
        raise ValueError("merge_lora needs the module that contains the adapted ones, not a LoRA module itself")
    adapted = [(n, m) for n, m in model.named_modules() if isinstance(m, LORA_MODULES)]
    for _, module in adapted:
        _refuse_quantized_merge(module)
    for name, module in adapted:
        base = module.base_layer
        if isinstance(module, LoRALinear):
            base.weight.copy_(module.merged_weight())
        else:
            gate_up, down = module.merged_weights()
            base.gate_up.copy_(gate_up)
            base.down.copy_(down)
        _set_child(model, name, base)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, under their names in ``model`` (``...attn.q.lora_A``, ``...experts.lora_down_B``)."""
    return {f"{prefix}.{key}" if prefix else key: tensor
            for prefix, module in model.named_modules() if isinstance(module, LORA_MODULES)
            for key, tensor in module.state_dict().items() if key.startswith("lora_")}


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block ``model`` computes as its base exactly (DPO's reference model, for one); then restores."""
    modules: list[Union[LoRALinear, LoRAExperts]] = [m for m in model.modules() if isinstance(m, LORA_MODULES)]
    before = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, enabled in zip(modules, before):
            m.enabled = enabled
