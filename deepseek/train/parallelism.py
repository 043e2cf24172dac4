"""What the Trainer asks of a parallel layout, and the one-process answer.

:class:`Parallelism` is the seam between the training loop and :mod:`deepseek.parallel`: the Trainer calls these
hooks and never imports ``torch.distributed`` plans itself. This base class is a single process; the
distributed layouts (DDP, FSDP, tensor, expert and pipeline parallelism on one device mesh) subclass it in
:mod:`deepseek.parallel.plan`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Optional

import torch
from torch import nn

if TYPE_CHECKING:
    from deepseek.train.trainer import Trainer


class Parallelism:
    """One process: every hook is the plain single-device behaviour."""

    rank = 0
    world_size = 1
    data_parallel_size = 1  # ranks that take distinct rows of the global batch
    data_rank = 0  # which share of the global batch this rank takes

    @property
    def is_main(self) -> bool:
        """The rank that writes metrics, logs, checkpoints (unless sharded) and the final model."""
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """Apply the layout to ``model`` (in place where the plan shards it) before the optimizer is built;
        returns the module to run forward through."""
        return model

    def gradient_sync(self, model: nn.Module, last_micro_batch: bool) -> ContextManager:
        """Around one micro-batch's forward/backward: data-parallel layouts defer the gradient reduction to
        the last micro-batch of a step."""
        return contextlib.nullcontext()

    def forward_backward(self, trainer: "Trainer", micro_batches: list[Any]) -> Optional[tuple[float, float]]:
        """Run forward and backward over the step's micro-batches and return ``(loss_sum, aux_sum)`` over them,
        or None to let the Trainer run its own loop (everything but pipeline parallelism)."""
        return None

    def before_optimizer_step(self, model: nn.Module) -> None:
        """After backward and clipping, before ``optimizer.step()``: e.g. sum the experts' load over ranks."""

    def grad_norm_fn(self) -> Optional[Callable[[list[nn.Parameter]], torch.Tensor]]:
        """For gradient clipping: a function of the parameters (with gradients) giving their global gradient
        norm, for layouts whose gradients differ per rank; None for the local norm."""
        return None

    def mean_over_ranks(self, figures: dict[str, float], keys: tuple[str, ...]) -> dict[str, float]:
        """``figures[keys]`` averaged over the data-parallel ranks (identical on every rank afterwards)."""
        return figures

    def barrier(self) -> None:
        pass

    def min_over_ranks(self, value: int) -> int:
        """The smallest ``value`` over the ranks (every rank gets it): e.g. the planned step count."""
        return value

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (so all ranks take the same branch)."""
        return flag

    # -- checkpoints and the final model ------------------------------------------------------------

    def save_checkpoint(self, trainer: "Trainer") -> Optional[Path]:
        """Write a checkpoint in the layout's own format and return its path, or None for the Trainer's
        (rank 0 writes a plain checkpoint of the unwrapped model)."""
        return None

    def resume(self, trainer: "Trainer") -> Optional[int]:
        """Restore the newest checkpoint in the layout's own format (returning its step), or raise
        NotImplementedError to let the Trainer restore a plain one."""
        raise NotImplementedError

    def checkpoint_shards(self, model: nn.Module) -> dict[str, tuple[Any, tuple]]:
        """Plain parameters holding only this rank's slice of a whole one (e.g. expert parallelism's local experts)
        as ``{name: (device_mesh, placements)}``, so that sharded checkpoints store and reshard them whole."""
        return {}

    def full_model(self, model: nn.Module) -> Optional[nn.Module]:
        """The whole, unsharded model for the final save, on the main rank (None elsewhere). Collective:
        every rank calls it."""
        return model

    def evaluate(self, trainer: "Trainer") -> Optional[dict[str, float]]:
        """Evaluate in the layout's own way (same result on every rank), or None for the Trainer's
        ``eval_fn(model)`` run on every rank."""
        return None

    def close(self) -> None:
        """Drop communication state (DDP reducers, pipeline stages) before the process group goes."""


def tensor_device(device: torch.device) -> torch.device:
    """Where small collective tensors live: the GPU for NCCL, the CPU for gloo."""
    return device if device.type == "cuda" else torch.device("cpu")
