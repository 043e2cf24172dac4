"""Parallelism applied to a model from outside it, on ``torch.distributed`` launched by ``torchrun``.

One device mesh (``plan``) composes data parallelism (``data_parallel``: DDP with gradient compression),
FSDP2 (``fsdp``), tensor (``tensor_parallel``), expert (``expert_parallel``) and pipeline (``pipeline``)
parallelism; ``checkpoint`` writes and reads sharded checkpoints (DCP); ``launch`` runs a torchrun rank;
``parameter_server`` is the asynchronous mode. See docs/distributed.md.
"""

from deepseek.parallel.data_parallel import sync_router_load, unwrap, wrap_data_parallel
from deepseek.parallel.env import (CollectiveTimeout, DistEnv, barrier, destroy, dist_env, init_distributed,
                               is_main_process, rank_errors)
from deepseek.parallel.plan import DistributedParallelism, build_parallelism

__all__ = ["CollectiveTimeout", "DistEnv", "DistributedParallelism", "barrier", "build_parallelism", "destroy",
           "dist_env", "init_distributed", "is_main_process", "rank_errors", "sync_router_load", "unwrap",
           "wrap_data_parallel"]
