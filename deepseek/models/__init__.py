"""The language model, its config and presets."""

from deepseek.models.config import PRESETS, ModelConfig, preset
from deepseek.models.transformer import Block, MoETransformer, RouterStats

__all__ = ["Block", "ModelConfig", "MoETransformer", "PRESETS", "RouterStats", "preset"]
