"""The parallel layout of a torchrun job: one device mesh, the plans applied to the model from outside it,
and the answers to the Trainer's questions (:class:`deepseek.train.parallelism.Parallelism`).

Mesh dimensions, outermost first: ``pp``, ``dp_replicate``, ``dp_shard``, ``ep``, ``tp`` (sizes from the
``parallel:`` config; a dimension of size 1 is simply not used). Plans are applied in the order that
composes: pipeline split, then tensor parallelism, then expert parallelism, then data parallelism (FSDP2
``fully_shard`` when ``dp_shard > 1``, else DDP).
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Optional

import torch
import torch.distributed as dist
from torch import nn

from deepseek.config import ConfigError
from deepseek.dist.data_parallel import sync_router_load, wrap_data_parallel
from deepseek.dist.env import DistEnv
from deepseek.train.parallelism import Parallelism, tensor_device
from deepseek.train.trainer_config import MESH_DIMS, ParallelConfig


def build_mesh(sizes: dict[str, int], device_type: str):
    """A :class:`~torch.distributed.device_mesh.DeviceMesh` over every rank with the named dimensions."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, tuple(sizes[d] for d in MESH_DIMS), mesh_dim_names=MESH_DIMS)


class DistributedParallelism(Parallelism):
    """A torchrun job's layout. Build it with :func:`build_parallelism` after the process group exists."""

    def __init__(self, config: ParallelConfig, env: DistEnv, device: torch.device):
        self.config = config
        self.rank, self.world_size = env.rank, env.world_size
        self.device = device
        self.sizes = config.degrees(env.world_size)
        self.mesh = build_mesh(self.sizes, device.type)
        coord = dict(zip(MESH_DIMS, self.mesh.get_coordinate()))
        self.coordinate = coord
        # Ranks of one (dp_replicate, dp_shard, ep) coordinate share rows; tp and pp ranks see the same batch.
        self.data_parallel_size = self.sizes["dp_replicate"] * self.sizes["dp_shard"] * self.sizes["ep"]
        self.data_rank = (coord["dp_replicate"] * self.sizes["dp_shard"] + coord["dp_shard"]) * self.sizes["ep"] \
            + coord["ep"]
        self._ddp: Optional[nn.Module] = None

    # -- applying the layout ------------------------------------------------------------------------

    def uses(self, dim: str) -> bool:
        return self.sizes[dim] > 1

    def only_data_parallel(self) -> bool:
        return not any(self.uses(d) for d in ("pp", "dp_shard", "ep", "tp"))

    def wrap(self, model: nn.Module) -> nn.Module:
        """Apply every plan of the layout, in the order that composes; returns the module to run forward."""
        if self.config.grad_compression != "none" and not self.uses("dp_replicate"):
            raise ConfigError("parallel.grad_compression needs data-parallel replicas (dp_replicate > 1)")
        if self.uses("pp"):
            model = self._apply_pipeline(model)
        if self.uses("tp"):
            self._apply_tensor_parallel(model)
        if self.uses("ep"):
            self._apply_expert_parallel(model)
        if self.uses("dp_shard"):
            return self._apply_fsdp(model)
        if self.uses("dp_replicate"):
            self._ddp = wrap_data_parallel(model, grad_compression=self.config.grad_compression)
            return self._ddp
        return model

    def _not_yet(self, what: str):
        return ConfigError(f"parallel: {what} is not implemented yet (layout {self.describe()})")

    def _apply_pipeline(self, model: nn.Module) -> nn.Module:
        raise self._not_yet("pp")

    def _apply_tensor_parallel(self, model: nn.Module) -> None:
        raise self._not_yet("tp")

    def _apply_expert_parallel(self, model: nn.Module) -> None:
        raise self._not_yet("ep")

    def _apply_fsdp(self, model: nn.Module) -> nn.Module:
        raise self._not_yet("dp_shard")

    def describe(self) -> str:
        return " x ".join(f"{d}={n}" for d, n in self.sizes.items() if n > 1) or "one process"

    # -- the Trainer's questions --------------------------------------------------------------------

    def gradient_sync(self, model: nn.Module, last_micro_batch: bool) -> ContextManager:
        if self._ddp is not None and not last_micro_batch:
            return self._ddp.no_sync()  # all-reduce once per step, on the last micro-batch's backward
        return contextlib.nullcontext()

    def before_optimizer_step(self, model: nn.Module) -> None:
        # Sum of the load over every rank: ranks that duplicate work (tp) scale all loads alike, and the
        # bias update only looks at each expert's load relative to the mean.
        sync_router_load(model)

    def mean_over_ranks(self, figures: dict[str, float], keys: tuple[str, ...]) -> dict[str, float]:
        present = [k for k in keys if k in figures]
        values = torch.tensor([float(figures[k]) for k in present], dtype=torch.float64,
                              device=tensor_device(self.device))
        dist.all_reduce(values)  # every rank holds its data rank's value (tp/pp ranks repeat theirs)
        return {**figures, **dict(zip(present, (values / self.world_size).tolist()))}

    def barrier(self) -> None:
        dist.barrier()

    def any_rank(self, flag: bool) -> bool:
        t = torch.tensor([int(flag)], device=tensor_device(self.device))
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def close(self) -> None:
        self._ddp = None  # the DDP reducer must go before the process group


def build_parallelism(config: ParallelConfig, env: DistEnv, device: torch.device) -> Parallelism:
    """The layout of this torchrun job (a single process gets the plain :class:`Parallelism`)."""
    if not env.is_distributed:
        return Parallelism()
    return DistributedParallelism(config, env, device)
