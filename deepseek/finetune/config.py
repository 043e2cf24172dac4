"""The fine-tuning config (``ds finetune run CONFIG [key=value ...]``): the model to start from, the SFT data,
LoRA or not, and the same trainer sections as ``ds train`` (optimizer, schedule, clip, checkpoint).

    ds finetune run configs/finetune-lora.yaml init=runs/quickstart/model data.train=sft/sft_train.jsonl

No ``lora`` section (or ``lora: null``) is a full fine-tune; a ``lora`` mapping holds
:class:`~deepseek.nn.lora.LoRAConfig` fields (r, alpha, dropout, rslora, target_modules).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from deepseek.config import ConfigError, apply_overrides, from_dict, read_mapping
from deepseek.nn.lora import LoRAConfig
from deepseek.train.config import (CheckpointConfig, ClipConfig, OptimizerConfig, ScheduleConfig, TrainConfig,
                                   _help)


@dataclass
class SFTDataConfig:
    """Where the chats come from (JSONL of ``{"messages": [...]}`` or ``{"prompt", "completion"}`` rows)."""

    train: Optional[str] = _help(None, "SFT JSONL file to train on (e.g. sft_train.jsonl of `ds finetune "
                                       "prepare-examples`; method: dpo, a preference JSONL such as "
                                       "preference_train.jsonl). Required.")
    eval: Optional[str] = _help(None, "SFT JSONL file whose mean assistant-token loss is logged as val_loss.")
    on_bad: Literal["skip", "error"] = _help("skip", "A bad row (not JSON, no assistant turn, longer than seq_len): "
                                                     "skip (with a warning) or error.")


@dataclass
class DPOConfig:
    """DPO's settings (``method: dpo``): the sigmoid loss of :func:`deepseek.finetune.objectives.dpo_loss`."""

    beta: float = _help(0.1, "Strength of the KL penalty towards the reference (larger = closer to it).")
    label_smoothing: float = _help(0.0, "cDPO: probability that a preference label is flipped, in [0, 0.5).")


@dataclass
class FinetuneConfig:
    """A fine-tuning run: ``init`` (a model directory) trained on SFT chats, fully or through LoRA adapters."""

    init: Optional[str] = _help(None, "The model directory to start from (ds.save output, a `ds convert --from-hf` "
                                      "import, a `ds compress` output). Required.")
    method: Literal["sft", "dpo"] = _help("sft", "The objective: sft (next-token loss on assistant tokens only) or "
                                                 "dpo (preference pairs; data.train is a preference JSONL).")
    dpo: DPOConfig = _help(DPOConfig, "The DPO section (method: dpo): beta, label_smoothing.")
    data: SFTDataConfig = _help(SFTDataConfig, "The data section.")
    lora: Optional[dict[str, Any]] = _help(None, "LoRAConfig fields (r, alpha, dropout, rslora, target_modules); "
                                                 "null = full fine-tune (every parameter trains).")
    seq_len: int = _help(512, "Tokens per packed row; longer examples are bad rows.")
    pack: bool = _help(True, "Pack several examples into one row (each attends only to itself); false = one "
                             "example per row.")
    run_dir: str = _help("runs/finetune", "Where metrics.jsonl, checkpoints/ and the result (adapter/ with LoRA, "
                                          "model/ without) go.")
    max_steps: int = _help(100, "Optimizer steps to run.")
    seed: int = _help(0, "Seed of the adapters' initialisation and the data order.")
    batch_size: int = _help(8, "Packed rows per optimizer step.")
    micro_batch_size: int = _help(0, "Rows per forward/backward (0 = batch_size).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _help("auto", "auto, fp32, bf16 or fp16 (as in ds train).")
    device: str = _help("auto", "auto (CUDA when available, else CPU), cpu, cuda or cuda:N.")
    gradient_checkpointing: bool = _help(False, "Recompute each block in backward: less memory, more time.")
    log_every: int = _help(10, "Write a metrics.jsonl record every N steps.")
    eval_every: int = _help(50, "Evaluate data.eval every N steps (0 = only at the end).")
    time_limit_minutes: float = _help(0.0, "Stop (saving a checkpoint and the result) after this many minutes.")
    progress: bool = _help(True, "Show a progress bar.")
    tensorboard: bool = _help(True, "Write TensorBoard scalars to run_dir/tensorboard.")
    optimizer: OptimizerConfig = _help(OptimizerConfig, "The optimizer section (AdamW).")
    schedule: ScheduleConfig = _help(ScheduleConfig, "The learning-rate schedule section.")
    clip: ClipConfig = _help(ClipConfig, "The gradient clipping section.")
    checkpoint: CheckpointConfig = _help(CheckpointConfig, "The checkpoint section.")

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "log_every", "seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_size % (self.micro_batch_size or self.batch_size):
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                              f"({self.micro_batch_size})")
        if not self.dpo.beta > 0:
            raise ConfigError(f"dpo.beta must be positive, got {self.dpo.beta}")
        if not 0 <= self.dpo.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {self.dpo.label_smoothing}")
        if self.lora is not None:
            try:
                LoRAConfig.from_dict(self.lora)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"lora: {exc}") from None

    def lora_config(self) -> Optional[LoRAConfig]:
        """The LoRAConfig of the ``lora`` section, or None for a full fine-tune."""
        return None if self.lora is None else LoRAConfig.from_dict(self.lora)

    def train_config(self) -> TrainConfig:
        """The :class:`TrainConfig` the Trainer runs with: this run's shared fields (model and data are ours)."""
        shared = {f.name for f in dataclasses.fields(TrainConfig)} & {f.name for f in dataclasses.fields(self)}
        shared -= {"data", "dpo"}
        return TrainConfig(**{name: getattr(self, name) for name in shared}, compile=False)

    def check_paths(self) -> None:
        """``init`` and ``data.train`` must be set and exist: a ConfigError naming the missing one otherwise."""
        if not self.init:
            raise ConfigError("init: set the model directory to fine-tune (e.g. init=runs/quickstart/model)")
        if not Path(self.init).is_dir():
            raise ConfigError(f"init: {self.init} is not a model directory")
        if not self.data.train:
            raise ConfigError("data.train: set the JSONL file to train on")
        for name in ("train", "eval"):
            path = getattr(self.data, name)
            if path and not Path(path).is_file():
                raise ConfigError(f"data.{name}: {path} does not exist")


def load_finetune_config(path: Optional[str | Path] = None, overrides: list[str] | None = None) -> FinetuneConfig:
    """A FinetuneConfig from a YAML/JSON file (or the defaults) with ``key=value`` overrides applied; unknown keys
    are a ConfigError listing the valid ones."""
    data = read_mapping(path) if path is not None else {}
    config = from_dict(FinetuneConfig, data)
    return apply_overrides(config, overrides or [])
