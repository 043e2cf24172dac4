"""``ds finetune run --nproc N``: one rank of a torchrun job (``ds finetune run`` re-launches itself under torchrun).

Each rank joins the process group, builds the data-parallel plan (DDP over every rank: gloo on CPU, NCCL on
CUDA) and runs :func:`deepseek.finetune.run.finetune` with it: every rank draws the same global batch and trains
on its share of the rows (:class:`~deepseek.finetune.run.SFTLoader`), gradients are averaged, and rank 0 alone
writes metrics, checkpoints and the result.
"""

from __future__ import annotations

from deepseek.finetune.config import FinetuneConfig
from deepseek.finetune.run import finetune
from deepseek.parallel import build_plan, destroy, init_distributed, rank_errors
from deepseek.train.trainer import TrainResult, resolve_device


def finetune_distributed(config: FinetuneConfig) -> TrainResult:
    """``finetune(config)`` on this rank of a torchrun job: process group, the plan, clean teardown."""
    train_config = config.train_config()
    env = init_distributed(timeout_s=train_config.parallel.timeout_s)
    try:
        with rank_errors(train_config.parallel.timeout_s):
            plan = build_plan(train_config.parallel, env, resolve_device(config.device))
            return finetune(config, plan)
    finally:
        destroy()
