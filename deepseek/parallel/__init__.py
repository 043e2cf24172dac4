"""Parallelism applied to a model from outside it, on ``torch.distributed`` launched by ``torchrun``.

``plan`` puts one process (:class:`ParallelPlan`) and a torchrun job's device mesh (:class:`MeshPlan`) behind one
interface whose hooks take explicit arguments (a model, a step function, micro-batches, a state dict). The mesh
plan composes data parallelism (``data_parallel``: DDP with gradient compression), FSDP2 (``fsdp``), tensor
(``tensor_parallel``), expert (``expert_parallel``) and pipeline (``pipeline``) parallelism; ``checkpoint`` writes
and reads sharded checkpoints (DCP) of a ``{name: Stateful}`` dict (in the folder of
:mod:`deepseek.checkpoint_folder`); ``config`` is the ``parallel:`` section; ``env`` and ``launch`` the torchrun
environment and re-launch. It never imports the training package: the training loop owns a plan, not the
reverse. See docs/distributed.md.
"""

from deepseek.parallel.config import MESH_DIMS, ParallelConfig
from deepseek.parallel.data_parallel import sync_router_load, unwrap, wrap_data_parallel
from deepseek.parallel.env import (CollectiveTimeout, DistEnv, barrier, destroy, dist_env, init_distributed,
                                   is_main_process, rank_errors)
from deepseek.parallel.plan import MeshPlan, ParallelPlan, StepFn, build_plan

__all__ = ["CollectiveTimeout", "DistEnv", "MESH_DIMS", "MeshPlan", "ParallelConfig", "ParallelPlan", "StepFn",
           "barrier", "build_plan", "destroy", "dist_env", "init_distributed", "is_main_process", "rank_errors",
           "sync_router_load", "unwrap", "wrap_data_parallel"]
