"""The global gradient norm of a model whose parameters are DTensors (FSDP shards, tensor-parallel slices)
next to plain, replicated ones: what gradient clipping needs to decide the same way on every rank."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import get_total_norm


def total_grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """L2 norm over the gradients of ``params``, each element counted once over all ranks: a 0-d plain tensor,
    the same on every rank.

    DTensor gradients are grouped by mesh and placements (a foreach norm wants one layout) and each group's
    norm is reduced over its mesh (``full_tensor``); plain gradients are replicated, so their local norm is
    already the global one. The groups' norms then combine as the root of the sum of squares.
    """
    from torch.distributed.tensor import DTensor

    groups: dict[object, list[torch.Tensor]] = {}
    for p in params:
        g = p.grad
        groups.setdefault((g.device_mesh, g.placements) if isinstance(g, DTensor) else None, []).append(g)
    norms = []
    for grads in groups.values():
        norm = get_total_norm(grads, norm_type=2.0, foreach=None)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if len(norms) == 1:
        return norms[0]
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
