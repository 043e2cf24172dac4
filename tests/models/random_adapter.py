"""A LoRA adapter directory with random weights (PEFT initialises B to zero, which would leave the output
unchanged): what the adapter loading and serving tests serve."""

import torch
from torch import nn

from deepseek.models.adapters import save_adapter
from deepseek.nn.lora import LoRAConfig, apply_lora


def save_random_adapter(model: nn.Module, folder, lora: LoRAConfig, seed: int, scale: float):
    """Adapt ``model`` (a fresh base, changed in place) with ``lora``, fill every adapter tensor with
    ``scale * N(0, 1)`` from ``seed`` and save the adapter to ``folder``; returns its path."""
    apply_lora(model, lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return save_adapter(model, folder)
