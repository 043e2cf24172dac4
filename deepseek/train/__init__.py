"""Training: optimizer and schedule, gradient clipping, checkpoints (see docs/training.md)."""

from deepseek.train.checkpoint import (CheckpointError, checkpoint_step, latest_checkpoint, list_checkpoints,
                                       load_checkpoint, save_checkpoint, verify_checkpoint)
from deepseek.train.clipping import ClipResult, GradientClipper
from deepseek.train.config import CheckpointConfig, ClipConfig, OptimizerConfig, ScheduleConfig
from deepseek.train.optim import build_optimizer, build_scheduler, lr_multiplier, param_groups
