"""The fine-tuning config (``ds finetune run CONFIG [key=value ...]``): the model to start from, the SFT data,
LoRA or not, and the same trainer sections as ``ds train`` (optimizer, schedule, clip, checkpoint).

    ds finetune run configs/finetune-lora.yaml init=runs/quickstart/model data.train=sft/sft_train.jsonl

No ``lora`` section (or ``lora: null``) is a full fine-tune; a ``lora`` mapping holds
:class:`~deepseek.nn.lora.LoRAConfig` fields (r, alpha, dropout, rslora, target_modules).

``method`` picks the objective: ``sft``, ``dpo``, ``reward`` (a Bradley–Terry reward model on preference pairs),
``grpo`` (sampled completions of a prompt file scored by reward functions; the ``grpo`` section) or ``mixed``
(``objective: {sft: 0.7, rl: 0.2, dpo: 0.1}``, one data file per term in the ``mixed`` section).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from deepseek.config import ConfigError, apply_overrides, from_dict, read_mapping
from deepseek.evaluation.codegen import STOP
from deepseek.finetune.objectives import OBJECTIVES, MixedObjective
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


GRPO_REWARDS = ("parses", "doctests", "length", "model")  # built-in reward functions, and a trained reward model


@dataclass
class GRPOConfig:
    """GRPO's settings (``method: grpo``, and the ``rl`` term of ``method: mixed``): each step samples
    ``group_size`` completions of every prompt with the policy, scores them with the weighted rewards and takes the
    clipped surrogate with a KL penalty (:func:`deepseek.finetune.objectives.grpo_loss`)."""

    group_size: int = _help(4, "Completions sampled per prompt (G >= 2; the advantages are normalised per group).")
    beta: float = _help(0.04, "Weight of the per-token KL to the reference (LoRA disabled, or a frozen copy); 0 = no "
                              "KL term.")
    clip_eps: float = _help(0.2, "The surrogate's ratio clip: [1 - clip_eps, 1 + clip_eps].")
    temperature: float = _help(1.0, "Sampling temperature of the completions (> 0: a group needs different samples).")
    top_p: float = _help(1.0, "Nucleus sampling of the completions (1 = off).")
    max_new_tokens: int = _help(64, "Longest completion, in tokens.")
    rewards: dict[str, float] = _help({"parses": 1.0, "doctests": 1.0, "length": 0.0},
                                      "Weight of each reward (the sum is the sample's reward): parses (prompt + "
                                      "completion parses as Python), doctests (its doctests pass, in the sandbox), "
                                      "length (1 - tokens / max_new_tokens), model (the reward_model's score).")
    reward_model: Optional[str] = _help(None, "A reward model directory (run_dir/reward of a `method: reward` run) "
                                              "scored with the weight rewards.model.")
    doctest_timeout_s: float = _help(5.0, "Wall-clock limit of one sandboxed doctest run.")
    prompt_style: Literal["completion", "chat"] = _help("completion", "completion: the model continues the prompt "
                                                        "(a def line and docstring); chat: the row's instruction is a "
                                                        "user turn of the chat template (as SFT data and serving), "
                                                        "the reply's code block is scored (as `ds eval --prompt-style "
                                                        "chat`).")
    stop: list[str] = _help(list(STOP), "Stop strings: a completion ends (and is cut) at the first one. The "
                                    "default ends a function where a new top-level statement begins, as "
                                    "`ds eval` does; [] = run to max_new_tokens. Completion style only: a "
                                    "chat reply ends at the template's end of turn.")

    def __post_init__(self) -> None:
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2:
            raise ConfigError(f"grpo.group_size must be an integer >= 2, got {self.group_size!r}")
        if self.beta < 0:
            raise ConfigError(f"grpo.beta must be >= 0, got {self.beta}")
        if not 0 < self.clip_eps < 1:
            raise ConfigError(f"grpo.clip_eps must be in (0, 1), got {self.clip_eps}")
        if not self.temperature > 0:
            raise ConfigError(f"grpo.temperature must be > 0 (the samples of a group must differ), got "
                              f"{self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"grpo.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"grpo.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        unknown = sorted(set(self.rewards) - set(GRPO_REWARDS))
        if unknown:
            raise ConfigError(f"grpo.rewards: unknown reward(s) {', '.join(unknown)}; known: {', '.join(GRPO_REWARDS)}")
        for name, weight in self.rewards.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ConfigError(f"grpo.rewards.{name} must be a number, got {weight!r}")
        if not any(self.rewards.values()):
            raise ConfigError("grpo.rewards: every weight is zero; give at least one reward a weight")
        if self.rewards.get("model") and not self.reward_model:
            raise ConfigError("grpo.rewards.model has a weight but grpo.reward_model names no reward model directory")
        if self.reward_model and not self.rewards.get("model"):
            raise ConfigError("grpo.reward_model is set but grpo.rewards.model (its weight) is missing or zero")

    def weights(self) -> dict[str, float]:
        """The rewards with a non-zero weight, name -> weight."""
        return {name: float(weight) for name, weight in self.rewards.items() if weight}


@dataclass
class MixedDataConfig:
    """The data file of each term of ``method: mixed`` (a term with weight 0 or no weight needs none)."""

    sft: SFTDataConfig = _help(SFTDataConfig, "The sft term: SFT chats JSONL (train, optional eval).")
    rl: SFTDataConfig = _help(SFTDataConfig, "The rl (GRPO) term: a prompts JSONL (train).")
    dpo: SFTDataConfig = _help(SFTDataConfig, "The dpo term: a preference JSONL (train, optional eval).")


@dataclass
class FinetuneConfig:
    """A fine-tuning run: ``init`` (a model directory) trained on SFT chats, fully or through LoRA adapters."""

    init: Optional[str] = _help(None, "The model directory to start from (ds.save output, a `ds convert --from-hf` "
                                      "import, a `ds compress` output). Required.")
    method: Literal["sft", "dpo", "reward", "grpo", "mixed"] = _help(
        "sft", "The objective: sft (next-token loss on assistant tokens only), dpo (preference pairs; data.train is "
               "a preference JSONL), reward (a Bradley-Terry reward model on preference pairs), grpo (data.train is "
               "a prompts JSONL; see the grpo section) or mixed (the objective weights, a file per term in mixed).")
    dpo: DPOConfig = _help(DPOConfig, "The DPO section (method: dpo): beta, label_smoothing.")
    grpo: GRPOConfig = _help(GRPOConfig, "The GRPO section (method: grpo, and the rl term of mixed).")
    objective: dict[str, float] = _help({}, "method: mixed: weight per term, e.g. {sft: 0.7, rl: 0.2, dpo: 0.1}.")
    mixed: MixedDataConfig = _help(MixedDataConfig, "method: mixed: the data section of each term (sft, rl, dpo).")
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
        if self.method == "mixed":
            try:
                MixedObjective(self.objective)
            except ValueError as exc:
                raise ConfigError(f"objective: {exc}") from None
        elif self.objective:
            raise ConfigError(f"objective is for method: mixed (this run's method is {self.method})")
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
        shared -= {"data", "dpo", "grpo", "objective", "mixed"}
        return TrainConfig(**{name: getattr(self, name) for name in shared}, compile=False)

    def mixed_terms(self) -> dict[str, float]:
        """method: mixed: the terms with a positive weight, in :data:`OBJECTIVES` order."""
        return {name: float(self.objective[name]) for name in OBJECTIVES if self.objective.get(name, 0) > 0}

    def data_sections(self) -> dict[str, SFTDataConfig]:
        """The data sections this run reads, by config path: ``data``, or the weighted terms' ``mixed.<term>``."""
        if self.method == "mixed":
            return {f"mixed.{term}": getattr(self.mixed, term) for term in self.mixed_terms()}
        return {"data": self.data}

    def check_paths(self) -> None:
        """``init`` and each data section's ``train`` must be set and exist (``eval`` too when set): a ConfigError
        naming the missing one otherwise."""
        if not self.init:
            raise ConfigError("init: set the model directory to fine-tune (e.g. init=runs/quickstart/model)")
        if not Path(self.init).is_dir():
            raise ConfigError(f"init: {self.init} is not a model directory")
        for where, section in self.data_sections().items():
            if not section.train:
                raise ConfigError(f"{where}.train: set the JSONL file to train on")
            for name in ("train", "eval"):
                path = getattr(section, name)
                if path and not Path(path).is_file():
                    raise ConfigError(f"{where}.{name}: {path} does not exist")
        if (self.method == "grpo" or "rl" in self.mixed_terms()) and self.grpo.reward_model \
                and not Path(self.grpo.reward_model).is_dir():
            raise ConfigError(f"grpo.reward_model: {self.grpo.reward_model} is not a reward model directory")


def load_finetune_config(path: Optional[str | Path] = None, overrides: list[str] | None = None) -> FinetuneConfig:
    """A FinetuneConfig from a YAML/JSON file (or the defaults) with ``key=value`` overrides applied; unknown keys
    are a ConfigError listing the valid ones."""
    data = read_mapping(path) if path is not None else {}
    config = from_dict(FinetuneConfig, data)
    return apply_overrides(config, overrides or [])
