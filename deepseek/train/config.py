"""Training config sections: optimizer, learning-rate schedule, gradient clipping, checkpoints.

Each section is a plain dataclass that the part reading it takes on its own (``build_optimizer``
takes an :class:`OptimizerConfig`, ``GradientClipper`` a :class:`ClipConfig`, ...). Every field
carries its help text in ``metadata["help"]``, from which the command line's ``--help`` is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from deepseek.config import ConfigError


def _check(cls_name: str, problems: list[str]) -> None:
    if problems:
        raise ConfigError(f"invalid {cls_name}: " + "; ".join(problems))


@dataclass
class OptimizerConfig:
    """AdamW (decoupled weight decay) and which parameters it decays."""

    lr: float = field(default=3e-4, metadata={"help": "peak learning rate (reached at the end of warm-up)"})
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={
        "help": "AdamW moment decay rates (beta1, beta2)"})
    eps: float = field(default=1e-8, metadata={"help": "AdamW denominator epsilon"})
    weight_decay: float = field(default=0.1, metadata={
        "help": "decoupled weight decay of matrices (norms, biases and embeddings get none)"})
    decay_embeddings: bool = field(default=False, metadata={
        "help": "also decay embedding (and tied head) weights"})
    fused: Optional[bool] = field(default=None, metadata={
        "help": "fused AdamW kernel; null = auto (fused on CUDA, foreach elsewhere)"})

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        problems = []
        if self.lr <= 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.eps <= 0:
            problems.append(f"eps must be positive, got {self.eps}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        _check("OptimizerConfig", problems)


@dataclass
class ScheduleConfig:
    """Learning rate: linear warm-up to ``lr``, then decay to ``lr * min_lr_ratio`` at the last step."""

    warmup_steps: int = field(default=100, metadata={
        "help": "steps of linear warm-up from lr/warmup_steps to lr"})
    decay: Literal["cosine", "linear", "constant"] = field(default="cosine", metadata={
        "help": "shape of the decay after warm-up: cosine, linear or constant"})
    min_lr_ratio: float = field(default=0.1, metadata={
        "help": "final learning rate as a fraction of lr (reached at max_steps)"})
    fit_time_limit: bool = field(default=True, metadata={
        "help": "with time_limit_minutes: measure the step time after warm-up and shorten the run (at most "
                "max_steps) so the decay ends at the time limit, not at a step count the machine may never reach"})

    def __post_init__(self) -> None:
        problems = []
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay not in ("cosine", "linear", "constant"):
            problems.append(f"decay must be cosine, linear or constant, got {self.decay!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check("ScheduleConfig", problems)


@dataclass
class ClipConfig:
    """Gradient-norm clipping; the dynamic rule is described in :class:`deepseek.train.GradientClipper`."""

    mode: Literal["none", "fixed", "dynamic"] = field(default="dynamic", metadata={
        "help": "none, fixed (clip at max_norm) or dynamic (clip at a threshold that follows recent gradient norms)"})
    max_norm: float = field(default=1.0, metadata={
        "help": "fixed threshold; in dynamic mode the threshold during warm-up and its ceiling after"})
    beta: float = field(default=0.98, metadata={
        "help": "dynamic: EMA factor of the log-norm statistics (memory of about 1/(1-beta) steps)"})
    sigmas: float = field(default=3.0, metadata={
        "help": "dynamic: clip above exp(mean + sigmas * std) of the log-norm"})
    warmup_steps: int = field(default=20, metadata={
        "help": "dynamic: steps that only collect statistics (clipping at max_norm)"})
    min_norm: float = field(default=1e-3, metadata={"help": "dynamic: the threshold never goes below this"})

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in ("none", "fixed", "dynamic"):
            problems.append(f"mode must be none, fixed or dynamic, got {self.mode!r}")
        if self.max_norm <= 0:
            problems.append(f"max_norm must be positive, got {self.max_norm}")
        if not 0 < self.beta < 1:
            problems.append(f"beta must be in (0, 1), got {self.beta}")
        if self.sigmas <= 0:
            problems.append(f"sigmas must be positive, got {self.sigmas}")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.min_norm <= 0 or (self.mode == "dynamic" and self.min_norm > self.max_norm):
            problems.append(f"min_norm must be in (0, max_norm], got {self.min_norm}")
        _check("ClipConfig", problems)


@dataclass
class CheckpointConfig:
    """When checkpoints are written, how many are kept, and whether a run resumes from the latest."""

    every: int = field(default=100, metadata={
        "help": "save a checkpoint every this many steps (0 = only at the end)"})
    keep_last: int = field(default=3, metadata={
        "help": "keep this many newest checkpoints, delete older ones (0 = keep all)"})
    resume: bool = field(default=False, metadata={
        "help": "resume from the newest valid checkpoint of the run directory"})
    save_final: bool = field(default=True, metadata={
        "help": "after the last step, save a checkpoint and the final model (run_dir/model)"})

    def __post_init__(self) -> None:
        problems = []
        if self.every < 0:
            problems.append(f"every must be >= 0, got {self.every}")
        if self.keep_last < 0:
            problems.append(f"keep_last must be >= 0, got {self.keep_last}")
        _check("CheckpointConfig", problems)
