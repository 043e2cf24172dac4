"""Quantized building blocks: Linear, grouped experts and embeddings holding int8 or int4 weights.

Schemes (the names ``compression.json`` and ``ds compress --method`` use):

``int8-dynamic``  int8 weights (one symmetric scale per output row) times int8 activations (one scale per token,
                  computed on the fly): the products are sums of integer products, then both scales are applied.
``int8-weight``   int8 weights as above, activations stay floating point.
``int4-weight``   4-bit weights in groups of ``group_size`` input columns, each group with its own scale and
                  minimum (asymmetric); two weights per byte on disk.

Kernels. Each scheme has a few named ways to run its products (:data:`KERNELS`), chosen at run time (never saved:
the same directory runs on every CPU):

``int_mm``         int8-dynamic: ``torch._int_mm`` (int8 x int8 -> int32), 3-5x faster than fp32 where the CPU has
                   VNNI or AMX; ~38x slower than fp32 on AVX2-only CPUs, where oneDNN also saturates 16-bit pair sums.
``int_mm_7bit``    int8-dynamic: ``_int_mm`` with the weights as first operand and 7-bit activations as second, so
                   pair sums stay below 2 * 255 * 63 < 32,768 without VNNI. What a forced ``int_mm`` becomes on a CPU
                   whose int8 products saturate (:func:`deepseek.hardware.int8_products_exact`). Exact, but slow there.
``int8pack_bf16``  int8-weight: bf16 activations into ``_weight_int8pack_mm`` (its fast path; fp32 input is ~20x
                   slower). Logits carry bf16 rounding.
``int4pack_bf16``  int4-weight: bf16 activations into ``_weight_int4pack_mm_for_cpu`` (its own weight layout, built
                   from the portable packed form at first use, not saved). Logits carry bf16 rounding.
``dequant``        every scheme: the weight is dequantized for each call (only the experts that have tokens) and
                   the product runs in fp32. int8-dynamic still rounds each token's activations to int8 exactly as
                   ``int_mm`` does and multiplies the integer values in fp32 before applying the scales: integer
                   sums below 2**24 are exact in fp32, so this path computes what ``int_mm`` computes (bit for bit
                   up to 1,040 input features) and what QAT trained. The weight-only schemes keep fp32 activations.

``auto`` (the default) resolves once per module, at its first product, from :func:`deepseek.hardware.hardware_profile`
(:func:`choose_kernel`): ``int_mm`` only where :func:`~deepseek.hardware.int8_products_fast` (VNNI/AMX, exact and
measured at least as fast as fp32), the bf16 kernels only where :func:`~deepseek.hardware.bf16_products_fast`, else
``dequant``. :func:`set_quantized_kernel` / :func:`quantized_kernel` force a path on a module tree (tests and
benchmarks compare paths that way); :func:`kernel_choices` says what a model runs with and why.

Why per-call dequantization rather than a cached fp32 copy: the cache would hold the fp32 model next to the
compressed one (5x the int8 memory), which defeats compressing; converting an [O, I] int8 weight costs about one
fp32 matrix-vector product, a few percent of a 128-token forward, but roughly doubles the cost of one decoding step.

Why these kernels: they ship in torch itself and are the ones that are fast on x86 CPUs that have VNNI/AMX and
native bf16 (measured in docs/benchmarks.md and docs/compression.md); torchao's CPU paths are slow in eager mode or
need kernels its PyPI wheel does not ship. Every buffer is a plain integer or float tensor, so a quantized model
saves to safetensors and loads without pickle. Off the CPU (or for shapes a kernel refuses) the products take the
``dequant`` path: correct everywhere, fast where the kernels exist.

Modules that do not fit are left in floating point: the router (its scores choose experts; tiny), norms, and
Linear layers with fewer than ``MIN_FEATURES`` outputs (a gate with one output).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from deepseek.hardware import (BF16_FLAGS, INT8_FLAGS, HardwareProfile, bf16_products_fast, hardware_profile,
                               int8_products_exact, int8_products_fast)
from deepseek.nn.attention import Attention
from deepseek.nn.mlp import SwiGLU
from deepseek.nn.dispatch import Dispatcher, LocalDispatch
from deepseek.nn.experts import GroupedExperts, span_rows
from deepseek.nn.router import Router

SCHEMES = ("int8-dynamic", "int8-weight", "int4-weight")
# The kernel paths of each scheme, fastest-where-supported first; "auto" picks one by the hardware.
KERNELS = {"int8-dynamic": ("int_mm", "int_mm_7bit", "dequant"),
           "int8-weight": ("int8pack_bf16", "dequant"),
           "int4-weight": ("int4pack_bf16", "dequant")}
INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # group sizes _weight_int4pack_mm_for_cpu accepts
MIN_FEATURES = 16


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; schemes: {', '.join(SCHEMES)}")
    return scheme


# -- number formats --------------------------------------------------------------------------------

def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row of ``w`` [..., O, I]: ``(q int8 [..., O, I], scale fp32 [..., O])``."""
    w = w.detach().float()
    scale = w.abs().amax(dim=-1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float().unsqueeze(-1)


def int4_group_size(in_features: int, group_size: int) -> int:
    """The group size used for ``in_features`` columns: ``group_size`` halved until it divides them (min 8)."""
    g = group_size
    while in_features % g and g > 8:
        g //= 2
    if in_features % g:
        raise ValueError(f"int4 needs in_features divisible by 8, got {in_features}")
    return g


def quantize_int4_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of input columns of ``w`` [..., O, I].

    Returns ``(packed uint8 [..., O, I/2], scale [..., O, I/g], minimum [..., O, I/g])`` with
    ``w ≈ q * scale + minimum``, q in 0..15; column ``2j`` is the low nibble of byte ``j``, ``2j+1`` the high one.
    """
    w = w.detach().float()
    g = int4_group_size(w.shape[-1], group_size)
    groups = w.unflatten(-1, (-1, g))
    minimum = groups.amin(dim=-1)
    scale = (groups.amax(dim=-1) - minimum).clamp_min(1e-12) / 15.0
    q = torch.round((groups - minimum.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp_(0, 15).to(torch.uint8).flatten(-2)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return packed, scale, minimum


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The 0..15 values of a packed [..., O, I/2] tensor as uint8 [..., O, I]."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)


def dequantize_int4_groups(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """``q * scale + minimum`` per group as fp32 [..., O, I] (nibbles written straight into fp32, then scaled in
    place: ~2x fewer passes than unpacking to uint8 first; the same values)."""
    groups = scale.shape[-1]
    w = torch.empty(*packed.shape[:-1], packed.shape[-1], 2, device=packed.device)
    w[..., 0] = packed & 0x0F
    w[..., 1] = packed >> 4
    w = w.view(*packed.shape[:-1], groups, -1)
    return w.mul_(scale.float().unsqueeze(-1)).add_(minimum.float().unsqueeze(-1)).flatten(-2)


def quantize_tokens_int8(x_MI: torch.Tensor, levels: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row (token) of ``x``: ``(q int8 [M, I] in -levels..levels, scale fp32 [M, 1])``.

    ``levels=63``: 7-bit values, for int8 products that would saturate 16-bit pair sums (``int_mm_7bit``).
    """
    q, scale = _round_tokens(x_MI, levels)
    return q.to(torch.int8), scale


def _round_tokens(x_MI: torch.Tensor, levels: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row rounded to integers in -levels..levels with its own scale: ``(fp32 integer values, scale [M, 1])``."""
    x = x_MI.detach().float()  # rounding has no useful gradient: products go straight through (StraightThroughProduct)
    # abs + amax: linalg.vector_norm(ord=inf) is ~30x slower on CPU for the same maximum.
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min_(1e-12).div_(levels)
    return (x / scale).round_(), scale


def quantize_rows(x_MI: torch.Tensor, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation rows of ``int8-dynamic`` as ``kernel`` multiplies them: int8 for the ``_int_mm`` kernels (7-bit for
    ``int_mm_7bit``), the same integers as fp32 for ``dequant``; with the per-row scales [M, 1]."""
    if kernel == "dequant":
        return _round_tokens(x_MI)
    return quantize_tokens_int8(x_MI, 63 if kernel == "int_mm_7bit" else 127)


# -- kernels: which product runs, chosen by the hardware -------------------------------------------

@dataclass(frozen=True)
class KernelChoice:
    """What a quantized module runs its products with on this device, and why."""

    scheme: str
    requested: str   # "auto" or a name of KERNELS[scheme]
    kernel: str      # the path that runs
    reason: str

    @property
    def dequantized(self) -> bool:
        """The fp32 path: the compressed model saves memory here but computes at (or below) fp32 speed."""
        return self.kernel == "dequant"

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "requested": self.requested, "kernel": self.kernel, "reason": self.reason}


def check_kernel(scheme: str, kernel: str) -> str:
    """``kernel`` if it is ``auto`` or one of ``scheme``'s paths, else a ValueError listing the valid ones."""
    valid = ("auto", *KERNELS[check_scheme(scheme)])
    if kernel not in valid:
        raise ValueError(f"unknown quantized kernel {kernel!r} for {scheme}; valid kernels: {', '.join(valid)}")
    return kernel


def _int8_evidence(profile: HardwareProfile) -> str:
    flags = [f for f in INT8_FLAGS if f in profile.flags]
    speedup = profile.speedup("int8")
    measured = f", {speedup:.2g}x fp32 measured" if speedup is not None else ""
    if not profile.native_int8:
        return "int8 products not fast on this CPU (no VNNI)"
    if not int8_products_exact(profile):
        return ("int8 products not exact on this CPU (16-bit pair sums saturate: oneDNN's int8 path without VNNI"
                f"{measured})")
    if not int8_products_fast(profile):
        return f"int8 products not fast on this CPU ({', '.join(flags)}{measured})"
    return f"int8 products fast on this CPU ({', '.join(flags)}{measured})"


def _bf16_evidence(profile: HardwareProfile) -> str:
    flags = [f for f in BF16_FLAGS if f in profile.flags]
    speedup = profile.speedup("bf16")
    measured = f", {speedup:.2g}x fp32 measured" if speedup is not None else ""
    if not profile.native_bf16:
        return "bf16 products not fast on this CPU (no native bf16)"
    fast = "fast" if bf16_products_fast(profile) else "not fast"
    return f"bf16 products {fast} on this CPU ({', '.join(flags)}{measured})"


def choose_kernel(scheme: str, requested: str, profile: HardwareProfile) -> KernelChoice:
    """The kernel path ``scheme`` runs with on a device of ``profile``: a pure function, so tests inject profiles.

    ``auto``: ``int_mm`` where :func:`~deepseek.hardware.int8_products_fast`, the bf16 kernels where
    :func:`~deepseek.hardware.bf16_products_fast`, else ``dequant`` (fp32). A forced ``int_mm`` on a CPU whose int8
    products saturate 16-bit pair sums runs as ``int_mm_7bit`` (7-bit activations), which stays exact there.
    Off the CPU every scheme dequantizes (the integer kernels used here are CPU kernels).
    """
    check_kernel(scheme, requested)
    if profile.device_type != "cpu":
        return KernelChoice(scheme, requested, "dequant", f"{profile.device_type}: the quantized kernels here are "
                                                          f"CPU kernels; dequantized product")
    if requested == "auto":
        if scheme == "int8-dynamic":
            fast, evidence = int8_products_fast(profile), _int8_evidence(profile)
        else:
            fast, evidence = bf16_products_fast(profile), _bf16_evidence(profile)
        kernel = KERNELS[scheme][0] if fast else "dequant"
        return KernelChoice(scheme, requested, kernel,
                            f"auto: {evidence}" + ("" if fast else ": dequantized fp32 path"))
    if requested == "int_mm" and not int8_products_exact(profile):
        return KernelChoice(scheme, requested, "int_mm_7bit", f"set explicitly; {_int8_evidence(profile)}: "
                                                              f"7-bit activations keep the sums exact")
    return KernelChoice(scheme, requested, requested, "set explicitly")


def _kernel_choice(module: nn.Module) -> KernelChoice:
    """``module``'s resolved kernel (a QuantizedWeight or QuantizedExperts): resolved at the first product, kept."""
    choice = module.__dict__.get("_kernel_choice")
    if choice is None:
        choice = module.__dict__["_kernel_choice"] = choose_kernel(module.scheme, module.kernel, hardware_profile())
    return choice


def _kernel_holders(model: nn.Module) -> list[nn.Module]:
    """The modules that choose a kernel: QuantizedExperts (for all their weights) and QuantizedWeights elsewhere."""
    holders, inside = [], set()
    for module in model.modules():
        if isinstance(module, QuantizedExperts):
            holders.append(module)
            inside.update(id(w) for w in (*module.gate_up, *module.down))
        elif isinstance(module, QuantizedWeight) and id(module) not in inside:
            holders.append(module)
    return holders


def set_quantized_kernel(model: nn.Module, kernel: str = "auto", *,
                         profile: Optional[HardwareProfile] = None) -> nn.Module:
    """Run every quantized module of ``model`` with ``kernel`` (``auto`` or a name of :data:`KERNELS`); returns it.

    Resolved at each module's next product from this process's hardware profile, or now from ``profile`` when
    given (to see what another CPU would run). A name that is not a path of some module's scheme is a ValueError
    listing the valid ones, and nothing is changed. Not saved: the kernel is a runtime choice.
    """
    holders = _kernel_holders(model)
    if not holders:
        raise ValueError("set_quantized_kernel: the model has no quantized modules")
    for module in holders:
        check_kernel(module.scheme, kernel)
    for module in holders:
        module.kernel = kernel
        module.__dict__["_kernel_choice"] = None if profile is None else choose_kernel(module.scheme, kernel, profile)
    return model


@contextlib.contextmanager
def quantized_kernel(model: nn.Module, kernel: str, *,
                     profile: Optional[HardwareProfile] = None) -> Iterator[nn.Module]:
    """``with quantized_kernel(model, "dequant"): ...`` runs ``model`` with ``kernel``, then restores what it had."""
    saved = [(m, m.kernel, m.__dict__.get("_kernel_choice")) for m in _kernel_holders(model)]
    set_quantized_kernel(model, kernel, profile=profile)
    try:
        yield model
    finally:
        for module, name, choice in saved:
            module.kernel = name
            module.__dict__["_kernel_choice"] = choice


def kernel_choices(model: nn.Module) -> dict[str, KernelChoice]:
    """``{module name: KernelChoice}`` for every quantized module of ``model`` (resolving ``auto`` if not yet)."""
    holders = {id(m) for m in _kernel_holders(model)}
    return {name: _kernel_choice(m) for name, m in model.named_modules() if id(m) in holders}


def _cpu_kernel(module: nn.Module, x: torch.Tensor) -> str:
    """The kernel for a product on ``x``: the module's choice on the CPU, ``dequant`` elsewhere."""
    return _kernel_choice(module).kernel if x.device.type == "cpu" else "dequant"


# -- products --------------------------------------------------------------------------------------

def int8_weight_matmul(x_MI: torch.Tensor, q_OI: torch.Tensor, scale_O: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` with int8 weights and bf16 activations (the kernel's fast path; fp32 input is ~20x slower)."""
    return torch.ops.aten._weight_int8pack_mm(x_MI.to(torch.bfloat16), q_OI, scale_O.to(torch.bfloat16)).float()


class Int4Kernel:
    """The CPU int4 kernel's own weight layout, built from the portable packed form on first use (not saved)."""

    def __init__(self):
        self.key = None
        self.weight = self.scales_and_zeros = None

    def usable(self, packed: torch.Tensor, scale: torch.Tensor) -> bool:
        out_features, groups = scale.shape
        group = packed.shape[-1] * 2 // groups
        return packed.device.type == "cpu" and out_features % 16 == 0 and group in INT4_KERNEL_GROUPS

    def matmul(self, x_MI: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
        key = (packed.data_ptr(), packed._version, scale.data_ptr(), scale._version)
        if self.key != key:
            q = unpack_int4(packed).to(torch.int32)
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            # The kernel computes (q - 8) * scale + zero, so zero = minimum + 8 * scale; layout [groups, O, 2].
            self.scales_and_zeros = torch.stack([scale, minimum + 8 * scale], dim=-1).transpose(0, 1).contiguous()
            self.scales_and_zeros = self.scales_and_zeros.to(torch.bfloat16)
            self.key = key
        group = packed.shape[-1] * 2 // scale.shape[-1]
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x_MI.to(torch.bfloat16), self.weight, group,
                                                          self.scales_and_zeros).float()


# -- modules ---------------------------------------------------------------------------------------

class QuantizedWeight(nn.Module):
    """One [out, in] weight in a scheme, with the products and row lookups the layers need.

    ``kernel``: the requested kernel path (``auto`` unless :func:`set_quantized_kernel` set one), resolved at the
    first product (:func:`choose_kernel`). Inside :class:`QuantizedExperts` the experts module chooses instead.
    """

    kernel = "auto"

    def __init__(self, scheme: str, out_features: int, in_features: int, group_size: int = 32,
                 device: Optional[torch.device] = None):
        super().__init__()
        self.scheme = check_scheme(scheme)
        self.out_features, self.in_features = out_features, in_features
        if scheme == "int4-weight":
            g = int4_group_size(in_features, group_size)
            self.register_buffer("packed", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scale", torch.empty(out_features, in_features // g, device=device))
            self.register_buffer("minimum", torch.empty(out_features, in_features // g, device=device))
            self._kernel = Int4Kernel()
        else:
            self.register_buffer("q", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scale", torch.empty(out_features, device=device))

    @torch.no_grad()
    def set_weight(self, w_OI: torch.Tensor, group_size: int = 32) -> "QuantizedWeight":
        if self.scheme == "int4-weight":
            packed, scale, minimum = quantize_int4_groups(w_OI, group_size)
            self.packed, self.scale, self.minimum = packed, scale, minimum
        else:
            self.q, self.scale = quantize_int8_rows(w_OI)
        return self

    def _transposed_q(self) -> torch.Tensor:
        """``q.t()``, kept between calls (a view op per product is ~2 % of a forward), renewed when q changes."""
        q = self.q
        cached = self.__dict__.get("_q_t")
        if cached is None or cached._base is not q:
            cached = self.__dict__["_q_t"] = q.t()
        return cached

    def dequantize(self) -> torch.Tensor:
        if self.scheme == "int4-weight":
            return dequantize_int4_groups(self.packed, self.scale, self.minimum)
        return dequantize_int8_rows(self.q, self.scale)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows ``W[ids]`` (an embedding lookup): fp32 [*ids.shape, in]."""
        if self.scheme == "int4-weight":
            return dequantize_int4_groups(self.packed[ids], self.scale[ids], self.minimum[ids])
        return dequantize_int8_rows(self.q[ids], self.scale[ids])

    def product(self, x_MI: torch.Tensor, kernel: str,
                quantized: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """``x @ W.T`` for 2-D ``x`` [M, in] with ``kernel`` (a name of ``KERNELS[scheme]``): fp32 [M, out].

        ``quantized``: int8-dynamic only, ``x``'s rows already as :func:`quantize_rows` gives them for ``kernel``.
        Differentiable w.r.t. ``x`` (for adapters trained on a quantized base, QLoRA): the forward value is the
        kernel's, the backward the straight-through ``grad @ W_dequantized`` (see :class:`StraightThroughProduct`).
        """
        if torch.is_grad_enabled() and x_MI.requires_grad:
            return StraightThroughProduct.apply(x_MI, self, kernel, quantized)
        return self._product(x_MI, kernel, quantized)

    def _product(self, x_MI: torch.Tensor, kernel: str,
                 quantized: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        if self.scheme == "int8-dynamic":
            xq, sx = quantized if quantized is not None else quantize_rows(x_MI, kernel)
            if kernel == "int_mm":
                y = torch._int_mm(xq, self._transposed_q()).float()
            elif kernel == "int_mm_7bit":  # weights first: oneDNN shifts the first operand, the 7-bit one stays small
                y = torch._int_mm(self.q, xq.t()).t().to(torch.float32, memory_format=torch.contiguous_format)
            else:  # integer values in fp32: sums below 2**24 are exact, so this equals the int32 product
                y = F.linear(xq, self.q.float())
            return y.mul_(sx).mul_(self.scale)
        if self.scheme == "int8-weight":
            if kernel == "int8pack_bf16":
                return int8_weight_matmul(x_MI, self.q, self.scale)
            return F.linear(x_MI.float(), self.q.float()).mul_(self.scale)  # row scales applied to the outputs
        if kernel == "int4pack_bf16" and self._kernel.usable(self.packed, self.scale):
            return self._kernel.matmul(x_MI, self.packed, self.scale, self.minimum)
        return F.linear(x_MI.float(), self.dequantize())

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for x [..., in] with this module's kernel: fp32 [..., out]."""
        x_MI = x.reshape(-1, self.in_features)
        return self.product(x_MI, _cpu_kernel(self, x)).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.scheme}, out={self.out_features}, in={self.in_features}"


class StraightThroughProduct(torch.autograd.Function):
    """``x @ W.T`` of a :class:`QuantizedWeight`: the forward runs the kernel (its value, bit for bit, whatever the
    path), the backward returns ``grad_out @ W_dequantized`` for ``x`` (the weights are frozen buffers: no grad).

    Why: only the ``dequant`` path of the weight-only schemes is differentiable as written; ``_int_mm`` and the
    int8/int4 pack kernels have no autograd formula, and int8-dynamic rounds its activations (zero gradient almost
    everywhere). Treating the rounding of the activations (int8-dynamic) and their bf16 cast (the pack kernels) as
    the identity is the straight-through estimator QAT and QLoRA use; for the weight-only ``dequant`` path it is the
    exact gradient. The dequantized weight is rebuilt in the backward (nothing fp32 is kept between calls).
    """

    @staticmethod
    def forward(ctx, x_MI, weight, kernel, quantized):
        ctx.weight, ctx.x_dtype = weight, x_MI.dtype
        return weight._product(x_MI, kernel, quantized)

    @staticmethod
    def backward(ctx, grad_MO):
        grad_MI = grad_MO.float() @ ctx.weight.dequantize().to(grad_MO.device)
        return grad_MI.to(ctx.x_dtype), None, None, None


class QuantizedLinear(nn.Module):
    """``nn.Linear`` with a quantized weight (bias kept in fp32). Output dtype follows the input's."""

    quantized = True

    def __init__(self, scheme: str, in_features: int, out_features: int, bias: bool = False, group_size: int = 32,
                 device: Optional[torch.device] = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_q = QuantizedWeight(scheme, out_features, in_features, group_size, device)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, group_size: int = 32) -> "QuantizedLinear":
        return cls.from_linears([linear], scheme, group_size)

    @classmethod
    def from_linears(cls, linears: list[nn.Linear], scheme: str, group_size: int = 32) -> "QuantizedLinear":
        """One quantized product for Linears that read the same input, their outputs concatenated in order.

        Rows are quantized independently, so the fused product equals the separate ones exactly.
        """
        weight = torch.cat([linear.weight.detach() for linear in linears])
        has_bias = linears[0].bias is not None
        module = cls(scheme, weight.shape[1], weight.shape[0], has_bias, group_size)
        module.weight_q.set_weight(weight, group_size)
        if has_bias:
            module.bias.data = torch.cat([linear.bias.detach().float() for linear in linears])
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.weight_q.matmul(x)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype) if x.is_floating_point() else y

    head_logits = forward  # used as an untied LM head


class QuantizedEmbedding(nn.Module):
    """``nn.Embedding`` with quantized rows; ``head_logits`` is the tied LM head over the same table."""

    quantized = True

    def __init__(self, scheme: str, num_embeddings: int, embedding_dim: int, group_size: int = 32,
                 device: Optional[torch.device] = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight_q = QuantizedWeight(scheme, num_embeddings, embedding_dim, group_size, device)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, scheme: str, group_size: int = 32) -> "QuantizedEmbedding":
        module = cls(scheme, embedding.num_embeddings, embedding.embedding_dim, group_size)
        module.weight_q.set_weight(embedding.weight, group_size)
        return module

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_q.rows(ids)

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight_q.matmul(x)


class QuantizedExperts(nn.Module):
    """:class:`~deepseek.nn.experts.GroupedExperts` with quantized expert weights (same dispatch contract): an
    :class:`~deepseek.nn.experts.ExpertCompute` whose products are the scheme's, behind the same dispatchers.

    Each expert that has rows runs its two products on them, in fp32 (the output is cast back to the input's
    dtype); with ``int8-dynamic`` the rows are quantized once per projection for all experts together.
    ``kernel`` (see :class:`QuantizedWeight`) is chosen here for all expert weights. ``dispatcher``: as for
    :class:`~deepseek.nn.experts.GroupedExperts`, but compiled decoding groups on the host too (quantized weights
    are not gathered per pair).
    """

    quantized = True
    kernel = "auto"

    def __init__(self, scheme: str, n_experts: int, d_model: int, ffn_dim: int, group_size: int = 32,
                 device: Optional[torch.device] = None, dispatcher: Optional[Dispatcher] = None):
        super().__init__()
        self.scheme, self.n_experts, self.ffn_dim, self.d_model = check_scheme(scheme), n_experts, ffn_dim, d_model
        self.gate_up = nn.ModuleList(QuantizedWeight(scheme, 2 * ffn_dim, d_model, group_size, device)
                                     for _ in range(n_experts))
        self.down = nn.ModuleList(QuantizedWeight(scheme, d_model, ffn_dim, group_size, device)
                                  for _ in range(n_experts))
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatch(gathered=False)

    @classmethod
    def from_experts(cls, experts: nn.Module, scheme: str, group_size: int = 32) -> "QuantizedExperts":
        n, two_f, d = experts.gate_up.shape
        module = cls(scheme, n, d, two_f // 2, group_size)
        for e in range(n):
            module.gate_up[e].set_weight(experts.gate_up[e], group_size)
            module.down[e].set_weight(experts.down[e], group_size)
        return module

    def forward(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor) -> torch.Tensor:
        return self.dispatcher(x_ND, weights_NK, experts_NK, self).to(x_ND.dtype)

    # -- ExpertCompute ---------------------------------------------------------------------------------

    def rows_dtype(self, x_ND: torch.Tensor) -> torch.dtype:
        return torch.float32

    def grouped(self, x_MD: torch.Tensor, counts_E: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        """The products of the experts that have rows (one host read of the group sizes)."""
        spans, start = [], 0
        for e, count in enumerate(counts_E.tolist()):
            if count:  # only experts with rows run (and, on the dequant path, are dequantized)
                spans.append((e, start, start + count))
                start += count
        return torch.cat(self.spans(x_MD, spans)) if spans else torch.zeros_like(x_MD)

    def spans(self, x_MD: torch.Tensor, spans: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """Expert e on rows a:b for each ``(e, a, b)``: down(silu(gate) * up), fp32."""
        kernel = _cpu_kernel(self, x_MD)
        if self.scheme != "int8-dynamic":
            return [self._products(e, span_rows(x_MD, a, b), kernel) for e, a, b in spans]
        # Rows are quantized per row, so one quantization for all spans equals one per span, in fewer ops.
        x_q, x_scale = quantize_rows(x_MD, kernel)
        hidden = []
        for e, a, b in spans:
            rows_q = (span_rows(x_q, a, b), span_rows(x_scale, a, b))
            gate_up = self.gate_up[e].product(span_rows(x_MD, a, b), kernel, rows_q)
            hidden.append(F.silu(gate_up[:, :self.ffn_dim]).mul_(gate_up[:, self.ffn_dim:]))
        if len(hidden) == 1:
            return [self.down[spans[0][0]].product(hidden[0], kernel)]
        h_q, h_scale = quantize_rows(torch.cat(hidden), kernel)
        out, start = [], 0
        for (e, _, _), h in zip(spans, hidden):
            end = start + h.shape[0]
            out.append(self.down[e].product(h, kernel, (h_q[start:end], h_scale[start:end])))
            start = end
        return out

    def expert(self, e: int, x_MD: torch.Tensor) -> torch.Tensor:
        return self._products(e, x_MD.float(), _cpu_kernel(self, x_MD))

    def _products(self, e: int, rows: torch.Tensor, kernel: str) -> torch.Tensor:
        gate_up = self.gate_up[e].product(rows, kernel)
        hidden = F.silu(gate_up[:, :self.ffn_dim]).mul_(gate_up[:, self.ffn_dim:])
        return self.down[e].product(hidden, kernel)

    def extra_repr(self) -> str:
        return f"{self.scheme}, experts={self.n_experts}, d_model={self.d_model}, ffn_dim={self.ffn_dim}"


# -- whole models ----------------------------------------------------------------------------------

def quantize_modules(model: nn.Module, scheme: str, *, group_size: int = 32, embeddings: bool = True,
                     skeleton: bool = False) -> nn.Module:
    """Swap every eligible Linear, grouped-experts and embedding module of ``model`` for its quantized form.

    In place; returns ``model``. ``skeleton=True`` only builds empty quantized modules of the right shapes (to
    load saved quantized weights into). Routers, norms and Linear layers with fewer than ``MIN_FEATURES``
    outputs stay in floating point.
    """
    check_scheme(scheme)
    device = None if skeleton else torch.device("cpu")

    def fuse(parent: nn.Module, fused_name: str, names: tuple[str, ...]) -> None:
        """Replace Linears ``names`` of ``parent`` (same input) by one product ``fused_name``."""
        linears = [getattr(parent, name) for name in names]
        if skeleton:
            fused = QuantizedLinear(scheme, linears[0].in_features, sum(lin.out_features for lin in linears),
                                    linears[0].bias is not None, group_size, device)
        else:
            fused = QuantizedLinear.from_linears(linears, scheme, group_size)
        setattr(parent, fused_name, fused)
        for name in names:
            setattr(parent, name, None)

    def convert(module: nn.Module) -> Optional[nn.Module]:
        if isinstance(module, GroupedExperts):
            if skeleton:
                n, two_f, d = module.gate_up.shape
                return QuantizedExperts(scheme, n, d, two_f // 2, group_size, device)
            return QuantizedExperts.from_experts(module, scheme, group_size)
        if isinstance(module, nn.Linear) and module.out_features >= MIN_FEATURES:
            if skeleton:
                return QuantizedLinear(scheme, module.in_features, module.out_features, module.bias is not None,
                                       group_size, device)
            return QuantizedLinear.from_linear(module, scheme, group_size)
        if embeddings and isinstance(module, nn.Embedding):
            if skeleton:
                return QuantizedEmbedding(scheme, module.num_embeddings, module.embedding_dim, group_size, device)
            return QuantizedEmbedding.from_embedding(module, scheme, group_size)
        return None

    def walk(parent: nn.Module) -> None:
        if isinstance(parent, Attention) and parent.qkv is None and isinstance(parent.q, nn.Linear):
            fuse(parent, "qkv", ("q", "k", "v"))
        elif isinstance(parent, SwiGLU) and parent.gate_up is None and isinstance(parent.gate, nn.Linear):
            fuse(parent, "gate_up", ("gate", "up"))
        for name, child in list(parent.named_children()):
            if isinstance(child, Router) or getattr(child, "quantized", False):
                continue
            replacement = convert(child)
            if replacement is not None:
                setattr(parent, name, replacement)
            else:
                walk(child)

    walk(model)
    return model


def is_quantized(model: nn.Module) -> bool:
    """The model holds quantized modules (:func:`quantize_modules` ran on it)."""
    return any(getattr(m, "quantized", False) for m in model.modules())
