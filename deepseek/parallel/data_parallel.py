"""Data parallelism: every rank holds the whole model, sees its share of the global batch, and gradients are
averaged with DDP's bucketed all-reduce (optionally compressed by a DDP communication hook)."""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from deepseek.config import ConfigError

COMPRESSIONS = ("none", "fp16", "bf16", "powersgd")


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while hasattr(model, "_orig_mod") or isinstance(model, DistributedDataParallel):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def wrap_data_parallel(model: nn.Module, *, grad_compression: str = "none",
                       powersgd_rank: int = 2, powersgd_start_iter: int = 2,
                       process_group: Optional[torch_dist.ProcessGroup] = None) -> DistributedDataParallel:
    """Wrap ``model`` (already on its device) in DDP over ``process_group`` (default: every rank).

    ``grad_compression``: ``none`` (fp32 all-reduce), ``fp16`` (``fp16_compress_hook``), ``bf16``
    (``bf16_compress_hook``: NCCL only) or ``powersgd`` (``powerSGD_hook``, low-rank, with error feedback).
    Buffers are not broadcast each forward: they are identical on every rank by construction (the MoE
    bias update uses the all-reduced expert load, see :func:`sync_router_load`).
    """
    if not torch_dist.is_initialized():
        raise RuntimeError("wrap_data_parallel needs an initialized process group (launch with torchrun)")
    if grad_compression not in COMPRESSIONS:
        raise ConfigError(f"parallel.grad_compression: unknown {grad_compression!r}; valid: {', '.join(COMPRESSIONS)}")
    backend = torch_dist.get_backend()
    if grad_compression == "bf16" and backend != "nccl":
        raise ConfigError(f"parallel.grad_compression=bf16 needs the NCCL backend (GPU); this run uses {backend}. "
                          f"Use fp16 or powersgd on CPU/gloo")
    device = next(model.parameters()).device
    device_ids = [device.index] if device.type == "cuda" and device.index is not None else None
    no_buffer_sync = ({"forward_sync_buffers": False}  # torch >= 2.13 name; buffers are still synced once at init
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    ddp = DistributedDataParallel(model, device_ids=device_ids, process_group=process_group, **no_buffer_sync)
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if grad_compression == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif grad_compression == "bf16":
        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif grad_compression == "powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=process_group, matrix_approximation_rank=powersgd_rank,
                                            start_powerSGD_iter=powersgd_start_iter)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    return ddp


def sync_router_load(model: nn.Module, group: Optional[torch_dist.ProcessGroup] = None) -> None:
    """Sum every router's accumulated expert load over the ranks of ``group`` (default: every rank), so the
    aux-loss-free bias update (:func:`deepseek.nn.moe.update_router_biases`) sees the global load and stays
    identical on every rank. Pipeline stages pass the ranks that hold the same layers."""
    if not (torch_dist.is_initialized() and torch_dist.get_world_size(group) > 1):
        return
    loads = [b for name, b in unwrap(model).named_buffers() if name.endswith("load_accum")]
    if not loads:
        return
    flat = torch.cat([b.flatten() for b in loads])
    torch_dist.all_reduce(flat, group=group)
    offset = 0
    for b in loads:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()
