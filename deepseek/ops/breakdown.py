"""Where a profiled step goes: every operator's self time assigned to one category, and the big products for a
roofline.

Categories come from three sources, nearest first:

- the step's own name scopes: ``Optimizer.step#…``/``Optimizer.zero_grad#…`` (torch's optimizers record them),
  ``ds::…`` scopes that :func:`label_modules` opens around the model's attention, router, experts and head + loss
  while a step is profiled (forward hooks: nothing in ``deepseek.nn`` changes and nothing runs unprofiled), and
  ``ds::data_loading``/``ds::optimizer`` that the profiling loop puts around ``next(loader)`` and clipping;
- backward: an op under ``autograd::engine::evaluate_function: XBackward`` takes the scope of the forward op that
  made node X (same ``sequence_nr``);
- the op itself: GEMMs (``mm``, ``addmm``, ``_grouped_mm``, …) are ``matmul`` wherever they run (projections,
  experts, head), except the batched products inside attention, which are attention's.

Self times of a step's tree sum to the step's time by construction; what no rule claims (norms, activations,
embedding, residual adds, Python between ops) is ``other``.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import torch
from torch.autograd.profiler import record_function

CATEGORIES = ("matmul", "attention", "moe_routing", "moe_dispatch_combine", "loss_head", "optimizer", "data_loading",
              "communication", "other")
SCOPE = "ds::"
GEMM_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm", "aten::_int_mm",
                      "aten::mv", "aten::addmv", "aten::dot", "aten::linear", "aten::matmul",
                      "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu"})
BATCHED_OPS = frozenset({"aten::bmm", "aten::baddbmm", "aten::matmul"})  # attention's own QKᵀ / PV products
COMM_PREFIXES = ("c10d::", "nccl:", "gloo:", "record_param_comms")
BACKWARD = "autograd::engine::evaluate_function: "
LOSS_NAMES = ("CrossEntropy", "NllLoss", "LogSoftmax")


def _module_scopes(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    from deepseek.nn.attention import Attention
    from deepseek.nn.experts import GroupedExperts
    from deepseek.nn.moe import MoE
    from deepseek.nn.router import Router

    kinds = ((Attention, "attention"), (Router, "moe_routing"), (GroupedExperts, "moe_dispatch_combine"),
             (MoE, "moe_dispatch_combine"))
    return [(module, SCOPE + label) for module in model.modules() for cls, label in kinds if isinstance(module, cls)]


@contextlib.contextmanager
def label_modules(model: torch.nn.Module) -> Iterator[None]:
    """Open a ``ds::<category>`` scope around the forward of the model's attention, routers, experts and MoE
    layers, and around its head + loss (from the final norm's output to the end of the model's forward)."""
    handles, open_scopes = [], defaultdict(list)

    def enter(key, name):
        def hook(*_):
            scope = record_function(name)
            scope.__enter__()
            open_scopes[key].append(scope)
        return hook

    def leave(key):
        def hook(*_):
            if open_scopes[key]:
                open_scopes[key].pop().__exit__(None, None, None)
        return hook

    for module, name in _module_scopes(model):
        handles += [module.register_forward_pre_hook(enter(id(module), name)),
                    module.register_forward_hook(leave(id(module)))]
    norm = getattr(model, "norm", None)
    if isinstance(norm, torch.nn.Module):
        handles += [norm.register_forward_hook(enter("head", SCOPE + "loss_head")),
                    model.register_forward_hook(leave("head"))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for scopes in open_scopes.values():  # a forward that raised inside a scope
            while scopes:
                scopes.pop().__exit__(None, None, None)


@contextlib.contextmanager
def scope(category: str) -> Iterator[None]:
    """A ``ds::<category>`` scope for work the model's hooks do not see (data loading, gradient clipping)."""
    with record_function(SCOPE + category):
        yield


# -- classification --------------------------------------------------------------------------------

def _scope_category(name: str) -> str:
    category = name[len(SCOPE):]
    return category if category in CATEGORIES else "other"


def _is_gemm(event) -> bool:
    return event.name in GEMM_OPS


def _context(event) -> tuple[Optional[str], Optional[object], bool]:
    """(nearest ds:: scope, nearest backward node event, inside an optimizer scope) above ``event``, nearest first:
    the scope counts only when it is nearer than the backward node (checkpointing reruns forwards in backward)."""
    label, node, optimizer = None, None, False
    walk = event
    while walk is not None:
        name = walk.name
        if name.startswith("Optimizer."):
            optimizer = True
        elif name.startswith(SCOPE) and label is None and node is None:
            label = name
        elif name.startswith(BACKWARD) and node is None and label is None:
            node = walk
        walk = walk.cpu_parent
    return label, node, optimizer


def classify(events: Iterable) -> dict[int, str]:
    """``{event id: category}`` for every event of one profiled cycle (``prof.events()``)."""
    events = sorted(events, key=lambda e: e.time_range.start)
    contexts = {e.id: _context(e) for e in events}
    forward_scope: dict[int, str] = {}  # sequence_nr -> category of the forward op that made that autograd node
    for e in events:
        label, node, optimizer = contexts[e.id]
        if node is None and not optimizer and e.sequence_nr is not None and e.sequence_nr >= 0:
            forward_scope[e.sequence_nr] = _scope_category(label) if label else "other"
    out = {}
    for e in events:
        label, node, optimizer = contexts[e.id]
        if optimizer:
            category = "optimizer"
        elif e.name.startswith(COMM_PREFIXES):
            category = "communication"
        elif label == SCOPE + "data_loading":
            category = "data_loading"
        else:
            if label is not None:
                category = _scope_category(label)
            elif node is not None:
                category = forward_scope.get(node.sequence_nr, "other")
                if category == "other" and any(word in node.name for word in LOSS_NAMES):
                    category = "loss_head"
            else:
                category = "other"
            if _is_gemm(e) and not (category == "attention" and e.name in BATCHED_OPS):
                category = "matmul"
        out[e.id] = category
    return out


@dataclass
class StepBreakdown:
    """One profiled step: its time (the ``ProfilerStep`` event's) and that time split by category (seconds)."""

    step_seconds: float
    seconds: dict[str, float] = field(default_factory=dict)


def step_breakdowns(events, device_time: bool = False) -> list[StepBreakdown]:
    """The breakdown of every ``ProfilerStep`` in a cycle's events: each op's *self* time to its category.

    ``device_time`` (CUDA; untested here, no GPU): each op's own kernels' GPU time instead, and whatever of the step
    no kernel covers (GPU idle: launches, host work, synchronisation) to ``other``.
    """
    events = list(events)
    categories = classify(events)
    steps: dict[int, StepBreakdown] = {}
    for e in events:
        root = e
        while root.cpu_parent is not None:
            root = root.cpu_parent
        if not root.name.startswith("ProfilerStep"):
            continue
        step = steps.setdefault(root.id, StepBreakdown(root.cpu_time_total / 1e6,
                                                       {c: 0.0 for c in CATEGORIES}))
        category = "other" if e is root else categories[e.id]
        own = e.self_device_time_total if device_time else e.self_cpu_time_total
        step.seconds[category] += own / 1e6
    if device_time:
        for step in steps.values():
            step.seconds["other"] += max(0.0, step.step_seconds - sum(step.seconds.values()))
    return list(steps.values())


# -- roofline points ---------------------------------------------------------------------------------

_ITEMSIZE = {"float": 4, "c10::BFloat16": 2, "c10::Half": 2, "double": 8, "signed char": 1, "int": 4,
             "long int": 8, "unsigned char": 1}


def _product_shape(name: str, shapes: list) -> Optional[tuple[int, list[list[int]]]]:
    """(FLOPs, [operand shapes, output shape]) of a GEMM from its input shapes, or None when it cannot tell."""
    try:
        if name == "aten::addmm":
            shapes = shapes[1:3]
        a, b = shapes[0], shapes[1]
        if name in ("aten::mm", "aten::addmm") and len(a) == 2 and len(b) == 2:
            return 2 * a[0] * a[1] * b[1], [a, b, [a[0], b[1]]]
        if name in ("aten::bmm", "aten::baddbmm") and len(a) == 3 and len(b) == 3:
            return 2 * a[0] * a[1] * a[2] * b[2], [a, b, [a[0], a[1], b[2]]]
        if name == "aten::_grouped_mm":
            if len(a) == 2 and len(b) == 3:    # rows sorted by expert x each expert's [K, N]
                return 2 * a[0] * a[1] * b[2], [a, b, [a[0], b[2]]]
            if len(a) == 2 and len(b) == 2:    # weight gradients: [K, M] x [M, N] per group -> [E, K, N]
                return 2 * a[0] * a[1] * b[1], [a, b, [a[0], b[1]]]
            if len(a) == 3 and len(b) == 3:
                return 2 * a[0] * a[1] * a[2] * b[2], [a, b, [a[0], a[1], b[2]]]
    except (IndexError, TypeError):
        return None
    return None


@dataclass
class OpPoint:
    """One (op, shapes) of the profiled steps: calls, seconds (inclusive), FLOPs and bytes moved (operands + output)."""

    name: str
    shapes: str
    calls: int = 0
    seconds: float = 0.0
    flops: float = 0.0
    bytes: float = 0.0

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else 0.0

    @property
    def flops_per_s(self) -> float:
        return self.flops / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {"op": self.name, "shapes": self.shapes, "calls": self.calls, "seconds": self.seconds,
                "flops": self.flops, "bytes": self.bytes, "intensity_flops_per_byte": self.intensity,
                "flops_per_s": self.flops_per_s}


def accumulate_points(events, points: dict[tuple[str, str], OpPoint]) -> None:
    """Add each GEMM and fused attention forward of ``events`` to ``points`` by (op, input shapes). FLOPs from the shapes (the profiler's
    ``with_flops`` skips ``_grouped_mm``); bytes = operands read + output written at the inputs' element size."""
    for e in events:
        if _is_attention_kernel(e.name):
            shaped = _attention_shape(e.input_shapes or [])
        elif e.name not in GEMM_OPS or e.name in ("aten::linear", "aten::matmul"):
            continue  # linear/matmul are wrappers around the mm/addmm/bmm counted here
        elif _inside_product(e):
            continue  # e.g. a per-group mm inside _grouped_mm: the outer product counts it, with its time
        else:
            shaped = _product_shape(e.name, e.input_shapes or [])
        if shaped is None:
            continue
        flops, tensors = shaped
        dtypes = [d for d in (e.input_dtypes or []) if d in _ITEMSIZE]
        itemsize = _ITEMSIZE[dtypes[-1]] if dtypes else 4
        numel = sum(_numel(t) for t in tensors)
        key = (e.name, str(tensors[:3] if _is_attention_kernel(e.name) else tensors[:2]))
        point = points.setdefault(key, OpPoint(e.name, key[1]))
        point.calls += 1
        point.seconds += e.cpu_time_total / 1e6
        point.flops += flops
        point.bytes += numel * itemsize


def _is_attention_kernel(name: str) -> bool:
    """A fused attention forward kernel (flash / efficient / math / CPU flash), not its backward."""
    return name.startswith("aten::_scaled_dot_product") and not name.endswith("_backward")


def _attention_shape(shapes: list) -> Optional[tuple[int, list[list[int]]]]:
    """(FLOPs, [q, k, v, out]) of a forward attention kernel from q [B, H, T, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv]:
    QKᵀ and PV, 4·B·H·T·S·D (the causal half not subtracted, as in the MFU formula)."""
    try:
        q, k, v = shapes[0], shapes[1], shapes[2]
        b, h, t, d = q
        s, dv = k[2], v[3]
    except (IndexError, TypeError, ValueError):
        return None
    return 2 * b * h * t * s * (d + dv), [q, k, v, [b, h, t, dv]]


def _inside_product(event) -> bool:
    walk = event.cpu_parent
    while walk is not None:
        if walk.name in GEMM_OPS and walk.name not in ("aten::linear", "aten::matmul"):
            return True
        walk = walk.cpu_parent
    return False


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
