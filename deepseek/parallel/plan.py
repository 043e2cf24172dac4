"""The parallel layout of a run behind one interface: :class:`ParallelPlan` (one process) and :class:`MeshPlan`
(a torchrun job's device mesh and the plans applied to the model from outside it).

The trainer owns a plan and calls its hooks with explicit arguments — the model, the step's micro-batches and its
step function (:class:`StepFn`), the ``{name: Stateful}`` dict to checkpoint — never with itself: this package
does not know the trainer.

Mesh dimensions, outermost first: ``pp``, ``dp_replicate``, ``dp_shard``, ``ep``, ``tp`` (sizes from the
``parallel:`` config; a dimension of size 1 is simply not used). Plans are applied in the order that
composes: pipeline split, then tensor parallelism, then expert parallelism, then data parallelism (FSDP2
``fully_shard`` when ``dp_shard > 1``, else DDP).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Protocol

import torch
import torch.distributed as torch_dist
from torch import nn

from deepseek.config import ConfigError
from deepseek.parallel.config import MESH_DIMS, ParallelConfig
from deepseek.parallel.data_parallel import sync_router_load, wrap_data_parallel
from deepseek.parallel.env import DistEnv, tensor_device

EvalFn = Callable[[nn.Module], dict[str, float]]


class StepFn(Protocol):
    """One step's forward + backward, as the training loop defines it (its ``ForwardBackward``).

    Called with the micro-batches and a ``grad_sync(last_micro_batch)`` context factory, it returns
    ``(loss_sum, aux_loss_sum)`` over them (the latter None without an aux loss). The pipeline runs its own schedule and takes only the step's autocast,
    its dtype (for the logits between stages) and its loss scaling."""

    autocast_dtype: Optional[torch.dtype]

    def __call__(self, micro_batches: list[Any], grad_sync: Optional[Callable[[bool], ContextManager]] = None
                 ) -> tuple[float, Optional[float]]: ...

    def autocast(self) -> ContextManager: ...

    def scale(self, loss: torch.Tensor) -> torch.Tensor: ...


class ParallelPlan:
    """One process: every hook is the plain single-device behaviour. :class:`MeshPlan` is the torchrun layout."""

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

    def forward_backward(self, model: nn.Module, micro_batches: list[Any],
                         step: StepFn) -> tuple[float, Optional[float]]:
        """Forward and backward of the step's micro-batches through ``model`` (what :meth:`wrap` returned):
        ``step`` with this layout's gradient synchronisation; ``(loss_sum, aux_sum)`` over them."""
        return step(micro_batches, lambda last: self.gradient_sync(model, last))

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

    def save_checkpoint(self, root: Path, step: int, states: dict[str, Any], *, tokenizer: Any = None,
                        keep_last: int = 3) -> Optional[Path]:
        """Write ``states`` (``{"model", "optimizer", ...: Stateful}``, see :mod:`deepseek.parallel.checkpoint`) as
        the checkpoint of ``step`` under ``root`` in the layout's own format and return its folder, or None for the
        caller's plain checkpoint (rank 0 writes the unwrapped model)."""
        return None

    def resume(self, root: Path, states: dict[str, Any]) -> Optional[tuple[Path, dict[str, Any]]]:
        """Restore the newest checkpoint under ``root`` into ``states`` in the layout's own way: ``(its folder,
        trainer.json's entries)`` or None when there is none; NotImplementedError lets the caller restore a plain
        one."""
        raise NotImplementedError

    def checkpoint_shards(self, model: nn.Module) -> dict[str, tuple[Any, tuple]]:
        """Plain parameters holding only this rank's slice of a whole one (e.g. expert parallelism's local experts)
        as ``{name: (device_mesh, placements)}``, so that sharded checkpoints store and reshard them whole."""
        return {}

    def full_model(self, model: nn.Module) -> Optional[nn.Module]:
        """The whole, unsharded model for the final save, on the main rank (None elsewhere). Collective:
        every rank calls it."""
        return model

    def evaluate(self, model: nn.Module, eval_fn: EvalFn) -> Optional[dict[str, float]]:
        """``eval_fn`` in the layout's own way (same result on every rank), or None for the caller's
        ``eval_fn(model)`` run on every rank."""
        return None

    def close(self) -> None:
        """Drop communication state (DDP reducers, pipeline stages) before the process group goes."""


def build_mesh(sizes: dict[str, int], device_type: str):
    """A :class:`~torch.distributed.device_mesh.DeviceMesh` over every rank with the named dimensions."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, tuple(sizes[d] for d in MESH_DIMS), mesh_dim_names=MESH_DIMS)


class MeshPlan(ParallelPlan):
    """A torchrun job's layout. Build it with :func:`build_plan` after the process group exists."""

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
        self._fsdp: Optional[nn.Module] = None  # the root FSDPModule (layouts with dp_shard or tp)
        self._pipeline = None  # deepseek.parallel.pipeline.Pipeline under pp: this rank's stage and schedule
        self._experts = None  # ExpertGradients under ep: the sharded experts' own reduction and norm

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
        if self.uses("dp_shard") or self.uses("tp"):
            return self._apply_fsdp(model)
        if self.uses("dp_replicate") or self.uses("ep"):  # ep ranks are data-parallel ranks for the rest
            replicas = self.mesh["dp_replicate"].get_group() if self.uses("pp") else None  # pp: a stage's replicas
            self._ddp = wrap_data_parallel(model, grad_compression=self.config.grad_compression, process_group=replicas)
            return self._ddp
        return model

    def _not_yet(self, what: str):
        return ConfigError(f"parallel: {what} is not implemented yet (layout {self.describe()})")

    def _apply_pipeline(self, model: nn.Module) -> nn.Module:
        from deepseek.parallel.pipeline import Pipeline

        self._pipeline = Pipeline(model, self.mesh, self.config.pp_schedule, self.device)
        return self._pipeline.stage_module

    def _apply_tensor_parallel(self, model: nn.Module) -> None:
        from deepseek.parallel.tensor_parallel import apply_tensor_parallel

        if self.uses("ep"):
            raise self._not_yet("tp combined with ep (tp composes with dp_shard, dp_replicate and pp)")
        apply_tensor_parallel(model, self.mesh["tp"])  # under pp: this stage's blocks only

    def _apply_expert_parallel(self, model: nn.Module) -> None:
        # Each ep rank keeps E/ep experts of every MoE layer (all-to-all dispatch); DDP or FSDP (over every
        # data-parallel rank, the ep ranks included) then averages everything else and ignores the experts, whose
        # gradients ExpertGradients reduces over the ranks holding the same experts (dp_replicate x dp_shard) in
        # gradient_sync.
        from torch.distributed.tensor import Shard
        from torch.nn.parallel import DistributedDataParallel

        from deepseek.parallel.expert_parallel import ExpertGradients, apply_expert_parallel, distribute_experts

        if any(self.uses(d) for d in ("pp", "tp")):
            raise self._not_yet("ep combined with pp or tp (ep composes with dp_replicate and dp_shard)")
        names = apply_expert_parallel(model, self.mesh["ep"].get_group())
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
        holders = [d for d in ("dp_replicate", "dp_shard") if self.uses(d)]  # ranks holding the same experts
        replicate = None
        if len(holders) == 1:
            replicate = self.mesh[holders[0]].get_group()
        elif holders:
            replicate = self.mesh["dp_replicate", "dp_shard"]._flatten("dp_replicate_shard").get_group()
        if self.uses("dp_shard"):
            # DTensors next to FSDP's, on the ep mesh alone (DCP reads that as replicated over the rest): on the
            # whole 5-D mesh, DTensor's sharding propagation of the first foreach ops took a minute.
            distribute_experts(model, self.mesh["ep"], (Shard(0),))
        self._experts = ExpertGradients(model, replicate, self.mesh["ep"].get_group(), self.data_parallel_size)

    def _apply_fsdp(self, model: nn.Module) -> nn.Module:
        # Also the data parallelism of tp layouts, even with dp_shard = 1: DDP would all-reduce over the tp ranks
        # too, and fully_shard turns every parameter into a DTensor (the tp-replicated norms, embedding and router
        # too), so foreach optimizers, clipping and DCP see one kind of tensor. dp_replicate > 1 makes it HSDP:
        # sharded within a replica, all-reduced across.
        from deepseek.parallel.fsdp import apply_fsdp

        # Under pp, ``model`` is this rank's PipelineStageModule: it becomes the FSDP root the PipelineStage runs
        # (the schedule defers the reduce-scatter to the last micro-batch and reshards after the step).
        if self.uses("ep"):
            # DeepSeek-V3's layout: the non-expert parameters are sharded over every rank that holds them, the ep
            # ranks included (dp_shard x ep flattened); the rank-local experts are left out (ExpertGradients).
            from deepseek.parallel.expert_parallel import expert_parameters

            shard = self.mesh["dp_shard", "ep"]._flatten("dp_shard_ep")
            self._fsdp = apply_fsdp(model, self.mesh["dp_replicate", "dp_shard_ep"] if self.uses("dp_replicate")
                                    else shard, ignored_params={p for _, p in expert_parameters(model)})
            return self._fsdp
        self._fsdp = apply_fsdp(model, self.mesh["dp_replicate", "dp_shard"] if self.uses("dp_replicate")
                                else self.mesh["dp_shard"])
        return self._fsdp

    def describe(self) -> str:
        return " x ".join(f"{d}={n}" for d, n in self.sizes.items() if n > 1) or "one process"

    # -- the hooks --------------------------------------------------------------------

    def gradient_sync(self, model: nn.Module, last_micro_batch: bool) -> ContextManager:
        if self._ddp is not None and not last_micro_batch:
            return self._ddp.no_sync()  # all-reduce once per step, on the last micro-batch's backward
        if self._fsdp is not None:
            from deepseek.parallel.fsdp import fsdp_gradient_sync

            sync = fsdp_gradient_sync(self._fsdp, last_micro_batch)  # reduce-scatter on the last one only
            return self._expert_gradient_sync(sync) if self._experts is not None and last_micro_batch else sync
        if self._experts is not None and last_micro_batch:
            return self._expert_gradient_sync()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _expert_gradient_sync(self, inner: Optional[ContextManager] = None):
        with inner or contextlib.nullcontext():
            yield  # the last micro-batch's forward/backward (DDP or FSDP reduces the rest during it)
        self._experts.sync()

    def before_optimizer_step(self, model: nn.Module) -> None:
        # Sum of the load over every rank: ranks that duplicate work (tp) scale all loads alike, and the
        # bias update only looks at each expert's load relative to the mean.
        sync_router_load(model, group=self._pipeline.data_group if self._pipeline is not None else None)

    def mean_over_ranks(self, figures: dict[str, float], keys: tuple[str, ...]) -> dict[str, float]:
        present = [k for k in keys if k in figures]
        values = torch.tensor([float(figures[k]) for k in present], dtype=torch.float64,
                              device=tensor_device(self.device))
        torch_dist.all_reduce(values)  # every rank holds its data rank's value (tp/pp ranks repeat theirs)
        return {**figures, **dict(zip(present, (values / self.world_size).tolist()))}

    def grad_norm_fn(self):
        if self._pipeline is not None:
            return self._pipeline.global_grad_norm  # each stage holds some layers' gradients
        if self._sharded():
            from deepseek.parallel.grad_norm import total_grad_norm

            return total_grad_norm  # DTensor gradients (experts too): each group's norm reduced over its mesh
        return self._experts.total_norm if self._experts is not None else None

    def _sharded(self) -> bool:
        """Parameters are DTensors (FSDP shards or tensor-parallel slices)."""
        return self._fsdp is not None or self.uses("tp")

    def forward_backward(self, model: nn.Module, micro_batches: list[Any],
                         step: StepFn) -> tuple[float, Optional[float]]:
        if self._pipeline is not None:
            return self._pipeline.forward_backward(model, micro_batches, step)
        return super().forward_backward(model, micro_batches, step)

    def evaluate(self, model: nn.Module, eval_fn: EvalFn) -> Optional[dict[str, float]]:
        if self._pipeline is not None:
            return self._pipeline.evaluate(model, eval_fn)  # the whole model gathered on rank 0, results broadcast
        return None

    def full_model(self, model: nn.Module) -> Optional[nn.Module]:
        if self._pipeline is not None:
            return self._pipeline.full_model(model)
        if self._sharded():
            from deepseek.parallel.full_model import gather_full_model

            return gather_full_model(model, self.is_main)  # distributed experts: full_tensor gathers them over ep
        if self._experts is not None:
            from deepseek.parallel.expert_parallel import full_model

            return full_model(model, self.mesh["ep"].get_group(), self.is_main)
        return model

    def save_checkpoint(self, root: Path, step: int, states: dict[str, Any], *, tokenizer: Any = None,
                        keep_last: int = 3) -> Optional[Path]:
        if not self.sharded_checkpoints():
            return None  # replicas: rank 0 writes the caller's plain checkpoint
        from deepseek.parallel.checkpoint import save_sharded_checkpoint

        return save_sharded_checkpoint(root, step, states, tokenizer=tokenizer, keep_last=keep_last,
                                       local_shards=self.checkpoint_shards(states["model"]))

    def checkpoint_shards(self, model: nn.Module) -> dict[str, tuple]:
        if self._experts is None or self._fsdp is not None:
            return {}  # under dp_shard the experts are DTensors already (distribute_experts)
        from torch.distributed.tensor import Replicate, Shard

        from deepseek.parallel.expert_parallel import expert_parameters

        # Rank r of the ep dimension holds experts [r*E/ep, (r+1)*E/ep): dim 0 sharded over ep, replicated elsewhere.
        placements = tuple(Shard(0) if d == "ep" else Replicate() for d in self.mesh.mesh_dim_names)
        return {name: (self.mesh, placements) for name, _ in expert_parameters(model)}

    def sharded_checkpoints(self) -> bool:
        """Whether checkpoints are DCP shards written by every rank (parallel.checkpoint_format; auto: when the
        layout shards parameters) rather than rank 0's plain checkpoint."""
        fmt = self.config.checkpoint_format
        if fmt == "plain" and not self.only_data_parallel():
            raise ConfigError(f"parallel.checkpoint_format=plain: layout {self.describe()} shards the parameters; "
                              f"use auto or sharded")
        return fmt == "sharded" or (fmt == "auto" and not self.only_data_parallel())

    def resume(self, root: Path, states: dict[str, Any]) -> Optional[tuple[Path, dict[str, Any]]]:
        # Replicas: the caller reads either format. A layout that shards parameters also reads a plain
        # checkpoint (every rank keeps its pieces of the whole tensors), e.g. a DDP run continued with FSDP.
        if self.only_data_parallel():
            raise NotImplementedError
        from deepseek.parallel.checkpoint import resume_sharded

        return resume_sharded(root, states, local_shards=self.checkpoint_shards(states["model"]))

    def barrier(self) -> None:
        torch_dist.barrier()

    def min_over_ranks(self, value: int) -> int:
        t = torch.tensor([int(value)], device=tensor_device(self.device))
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MIN)
        return int(t.item())

    def any_rank(self, flag: bool) -> bool:
        t = torch.tensor([int(flag)], device=tensor_device(self.device))
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return bool(t.item())

    def close(self) -> None:
        if self._pipeline is not None:
            self._pipeline.close()
        self._ddp = None  # the DDP reducer must go before the process group


def build_plan(config: ParallelConfig, env: DistEnv, device: torch.device) -> ParallelPlan:
    """The layout of this torchrun job (a single process gets the plain :class:`ParallelPlan`)."""
    if not env.is_distributed:
        return ParallelPlan()
    return MeshPlan(config, env, device)
