"""Training: the loop, its config, optimizer and schedule, gradient clipping, checkpoints (docs/training.md)."""

from deepseek.train.checkpoint import (CheckpointError, checkpoint_step, latest_checkpoint, list_checkpoints,
                                       load_checkpoint, save_checkpoint, verify_checkpoint)
from deepseek.train.clipping import ClipResult, GradientClipper
from deepseek.train.config import (CheckpointConfig, ClipConfig, DataConfig, OptimizerConfig, ScheduleConfig,
                                   TrainConfig, load_train_config)
from deepseek.train.optim import build_optimizer, build_scheduler, lr_multiplier, param_groups
from deepseek.train.lm import evaluate_lm, train_lm
from deepseek.train.metrics import read_metrics
from deepseek.train.trainer import Trainer, TrainResult

__all__ = ["CheckpointConfig", "CheckpointError", "ClipConfig", "ClipResult", "DataConfig", "GradientClipper",
           "OptimizerConfig", "ScheduleConfig", "TrainConfig", "TrainResult", "Trainer", "build_optimizer",
           "build_scheduler", "checkpoint_step", "evaluate_lm", "latest_checkpoint", "list_checkpoints",
           "load_checkpoint", "load_train_config", "lr_multiplier", "param_groups", "read_metrics", "save_checkpoint",
           "train_lm", "verify_checkpoint"]
