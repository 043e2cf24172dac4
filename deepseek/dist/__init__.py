"""Parallelism applied to a model from outside it, on ``torch.distributed`` launched by ``torchrun``.

This slice: data parallelism (DDP, ``parallel.dp_replicate``) with optional gradient compression.
FSDP, tensor, expert and pipeline parallelism are not implemented yet (see docs/distributed.md).
"""

from deepseek.dist.data_parallel import sync_router_load, unwrap, wrap_data_parallel
from deepseek.dist.env import (CollectiveTimeout, DistEnv, barrier, destroy, dist_env, init_distributed,
                               is_main_process, rank_errors)

__all__ = ["CollectiveTimeout", "DistEnv", "barrier", "destroy", "dist_env", "init_distributed", "is_main_process",
           "rank_errors", "sync_router_load", "unwrap", "wrap_data_parallel"]
