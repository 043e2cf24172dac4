"""The whole model out of a sharded one (FSDP, tensor parallelism): for the final save of a distributed run."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from deepseek.config import ConfigError


def gather_full_model(model: nn.Module, is_main: bool) -> Optional[nn.Module]:
    """Gather ``model``'s DTensor-sharded state and, on the main rank, load it into a fresh, plain
    :class:`~deepseek.models.MoETransformer` on the CPU (the sharded model's attribute changes, like local head
    counts, do not carry over). None on the other ranks. Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from deepseek.models.transformer import MoETransformer

    if not isinstance(model, MoETransformer):
        raise ConfigError(f"the final save of a sharded layout needs a MoETransformer (got {type(model).__name__})")
    # full_state_dict + cpu_offload: every rank joins the gathers, rank 0 alone keeps the tensors (on the CPU).
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return None
    with torch.device("cpu"):
        full = MoETransformer(model.config)
    full.load_state_dict(state, strict=True)
    return full
