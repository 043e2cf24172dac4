"""Tensor parallelism: every ``tp`` rank holds a slice of each block's widths and sees the same tokens.

Applied from outside the model (the model code knows nothing of it), with DTensor plans:

- attention: ``q``, ``k``, ``v`` column-wise (each rank owns ``n_heads / tp`` query heads and
  ``n_kv_heads / tp`` key/value heads), ``o`` row-wise (partial sums, all-reduced);
- dense SwiGLU and the shared expert: ``gate``, ``up`` column-wise, ``down`` row-wise;
- routed experts (:class:`~deepseek.nn.moe.GroupedExperts`): the expert width F is split, so each rank computes
  its slice of every expert and the outputs are summed over the ranks. ``gate_up`` [E, 2F, D] holds the gate
  rows then the up rows, so it is a ``_StridedShard(1, split_factor=2)`` DTensor: the local tensor is
  ``[gate_r; up_r]`` [E, 2F/tp, D], and ``full_tensor()`` gives back the original layout. ``down`` [E, D, F] is
  ``Shard(2)``.

Router, norms, embedding and head stay replicated (plain tensors): their inputs and the gradients reaching them
are identical on the tp ranks (every partial sum is all-reduced before it leaves a parallel region, in forward
and in backward), so they stay in sync without communication of their own.

Legend: N tokens, D model width, F expert width, E routed experts, K experts per token.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from deepseek.config import ConfigError
from deepseek.nn.attention import Attention
from deepseek.nn.mlp import SwiGLU
from deepseek.nn.dispatch import SortedDispatch
from deepseek.nn.experts import ExpertCompute, GroupedProduct
from deepseek.nn.moe import MoE, GroupedExperts


def check_tensor_parallel(model: nn.Module, tp: int) -> None:
    """Raise :class:`ConfigError` unless every head count and width of ``model`` splits into ``tp`` slices."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ConfigError(f"parallel.tp={tp} needs a transformer with `blocks` (got {type(model).__name__})")
    problems = []
    for i, block in enumerate(blocks):
        attn, ffn = block.attn, block.ffn
        if attn.qkv is not None:
            problems.append(f"blocks.{i}.attn has fused (quantized) q/k/v")
        for name, n in (("n_heads", attn.n_heads), ("n_kv_heads", attn.n_kv_heads)):
            if n % tp:
                problems.append(f"model.{name}={n} is not divisible by tp={tp}")
        mlps = [("ffn_dim", ffn)] if isinstance(ffn, SwiGLU) else []
        if isinstance(ffn, MoE):
            if ffn.experts.ffn_dim % tp:
                problems.append(f"model.moe_ffn_dim={ffn.experts.ffn_dim} is not divisible by tp={tp}")
            if ffn.shared is not None:
                mlps.append(("shared_ffn_dim", ffn.shared))
        for name, mlp in mlps:
            if mlp.gate_up is not None:
                problems.append(f"blocks.{i} has a fused (quantized) gate/up")
            elif mlp.gate.out_features % tp:
                problems.append(f"model.{name}={mlp.gate.out_features} is not divisible by tp={tp}")
    if problems:
        raise ConfigError(f"parallel.tp={tp} cannot split this model: " + "; ".join(dict.fromkeys(problems)))


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """Shard ``model``'s attention, MLPs and experts over the 1-D ``tp_mesh``, in place (see the module doc)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = tp_mesh.size()
    check_tensor_parallel(model, tp)
    for block in model.blocks:
        attn: Attention = block.attn
        parallelize_module(attn, tp_mesh, {"q": ColwiseParallel(), "k": ColwiseParallel(),
                                           "v": ColwiseParallel(), "o": RowwiseParallel()})
        attn.n_heads //= tp  # the forward views its projections as the local heads
        attn.n_kv_heads //= tp
        ffn = block.ffn
        for mlp in ([ffn] if isinstance(ffn, SwiGLU) else [ffn.shared] if ffn.shared is not None else []):
            parallelize_module(mlp, tp_mesh, {"gate": ColwiseParallel(), "up": ColwiseParallel(),
                                              "down": RowwiseParallel()})
        if isinstance(ffn, MoE):
            shard_experts(ffn.experts, tp_mesh)


def shard_experts(experts: GroupedExperts, tp_mesh) -> None:
    """Split the expert width F of ``experts`` over ``tp_mesh`` and make its forward sum the slices' outputs."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    gate_up, down = experts.gate_up, experts.down
    experts.gate_up = nn.Parameter(distribute_tensor(gate_up.data, tp_mesh, [_StridedShard(1, split_factor=2)]),
                                   requires_grad=gate_up.requires_grad)
    experts.down = nn.Parameter(distribute_tensor(down.data, tp_mesh, [Shard(2)]), requires_grad=down.requires_grad)
    experts.ffn_dim //= tp_mesh.size()  # the width of this rank's slice of every expert
    experts.dispatcher = TensorParallelDispatch(tp_mesh)


class TensorParallelDispatch:
    """This rank's slice of every chosen expert, summed over the tp ranks: [N, D].

    The tokens and routing weights enter as replicated values whose gradients are partial sums (all-reduced
    in backward); the output leaves as a partial sum, all-reduced in forward. Always the sorted dispatch: the
    decoding shortcuts index the full weights.
    """

    def __init__(self, tp_mesh):
        self.mesh, self.sorted = tp_mesh, SortedDispatch()

    def __call__(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor,
                 compute: ExpertCompute) -> torch.Tensor:
        from torch.distributed.tensor import DTensor, Partial, Replicate

        def enter(t: torch.Tensor) -> torch.Tensor:  # identity forward, all-reduced gradient
            replicated = DTensor.from_local(t, self.mesh, [Replicate()], run_check=False)
            return replicated.to_local(grad_placements=[Partial()])

        local = GroupedProduct(compute.gate_up.to_local(), compute.down.to_local())
        y_ND = self.sorted(enter(x_ND), enter(weights_NK), experts_NK, local)
        return DTensor.from_local(y_ND, self.mesh, [Partial()], run_check=False).full_tensor()

    def __repr__(self) -> str:
        return f"TensorParallelDispatch(tp={self.mesh.size()})"


def without_strided_shards(state: Any) -> tuple[Any, Callable[[], None]]:
    """``state`` (nested dicts/lists of tensors) for ``torch.distributed.checkpoint``, which cannot describe a
    ``_StridedShard`` (each rank's piece of ``gate_up`` is two separate row ranges): every such DTensor is
    redistributed to plain ``Shard`` placements of the same global tensor (a copy; the checkpoint holds the
    ordinary [E, 2F, D] layout, so any layout reads it). Returns the new state and ``copy_back()``, which
    writes what ``dcp.load`` put into the copies back into the original tensors."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    pairs: list[tuple[Any, Any]] = []

    def convert(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, list):
            return [convert(v) for v in value]
        if isinstance(value, DTensor) and any(isinstance(p, _StridedShard) for p in value.placements):
            plain = value.redistribute(placements=[Shard(p.dim) if isinstance(p, _StridedShard) else p
                                                   for p in value.placements])
            pairs.append((value, plain))
            return plain
        return value

    def copy_back() -> None:
        with torch.no_grad():
            for original, plain in pairs:
                original.to_local().copy_(plain.redistribute(placements=original.placements).to_local())

    return convert(state), copy_back
