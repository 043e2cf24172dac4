"""Fully sharded data parallelism (FSDP2 ``fully_shard``): each rank keeps 1/n of every parameter, gradient
and optimizer state, gathers a block's weights just before it runs and reduce-scatters its gradients after.

Each transformer block is one all-gather unit, the root (embedding, final norm, head) another. On a 2-D mesh
``(dp_replicate, dp_shard)`` this is HSDP: sharded within a replica group, all-reduced across groups.
Parameters already sharded by tensor parallelism (DTensors on the ``tp`` mesh) become 2-D DTensors.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from torch import nn

from deepseek.config import ConfigError


def apply_fsdp(model: nn.Module, mesh, ignored_params: Optional[set[nn.Parameter]] = None) -> nn.Module:
    """``fully_shard`` every block of ``model`` and then the root, in place, over ``mesh`` (1-D: FSDP, 2-D
    ``(replicate, shard)``: HSDP). ``ignored_params`` stay plain, rank-local tensors that FSDP neither shards nor
    reduces (expert parallelism's experts). Returns ``model``, now an ``FSDPModule``."""
    from torch.distributed.fsdp import fully_shard

    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ConfigError(f"parallel.dp_shard needs a transformer with `blocks` (got {type(model).__name__})")
    for i, block in enumerate(blocks):
        # The last block's weights are needed again right away by backward: keep them gathered.
        fully_shard(block, mesh=mesh, reshard_after_forward=i < len(blocks) - 1, ignored_params=ignored_params)
    fully_shard(model, mesh=mesh, reshard_after_forward=False, ignored_params=ignored_params)
    return model


@contextlib.contextmanager
def fsdp_gradient_sync(model: nn.Module, last_micro_batch: bool) -> Iterator[None]:
    """Accumulate unsharded gradients locally and reduce-scatter once, on the last micro-batch's backward."""
    model.set_requires_gradient_sync(last_micro_batch)
    yield
