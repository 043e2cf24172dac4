"""The training config: one dataclass per section, loaded from YAML, with ``key=value`` overrides.

    ds train configs/tiny.yaml run_dir=runs/r max_steps=20 seed=3 model.n_routed_experts=16

Each section is a plain dataclass that the part reading it takes on its own (``build_optimizer`` takes an
:class:`OptimizerConfig`, ``GradientClipper`` a :class:`ClipConfig`, the plans a
:class:`~deepseek.parallel.config.ParallelConfig`, the model a :class:`~deepseek.models.config.ModelConfig`).
Every field carries its help text in ``metadata["help"]``: ``ds train --help`` prints them all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from deepseek.config import ConfigError, apply_overrides, from_dict, read_mapping, split_override
from deepseek.models.config import PRESETS, ModelConfig, preset
from deepseek.parallel.config import ParallelConfig


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
        "help": "fused AdamW kernel; null = auto (fused on CUDA, and on CPU for plain (non-DTensor) parameters; "
                "foreach otherwise)"})

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


def _help(default: Any, text: str, **kwargs) -> Any:
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        factory = default if callable(default) and not isinstance(default, (list, dict)) else (lambda d=default: type(d)(d))
        return field(default_factory=factory, metadata={"help": text}, **kwargs)
    return field(default=default, metadata={"help": text}, **kwargs)


@dataclass
class DataConfig:
    """Where the tokens come from and how they are cut into batches."""

    path: Optional[str] = _help(None, "A directory written by `ds prepare` (index.json + shards): the one source.")
    sources: dict[str, Any] = _help({}, "Several named prepared directories mixed by weight instead of `path`: "
                                        "{name: {path: DIR, weight: W}}, e.g. general 8 / code 1 / domain 1.")
    seq_len: int = _help(256, "Tokens per training row (the context the model learns on).")
    curriculum: list[list[int]] = _help([], "Sequence-length curriculum as [[step, seq_len], ...] from step 0, "
                                            "e.g. [[0, 128], [200, 512]]; overrides seq_len when set.")
    prepare_from: list[str] = _help([], "If `path` has not been prepared yet: files, directories or globs to prepare "
                                        "it from ({stdlib} = this Python's standard library).")
    exclude: list[str] = _help([], "fnmatch patterns of paths to leave out when preparing (e.g. '*/test/*').")
    tokenizer: str = _help("byte", "Tokenizer used when preparing: 'byte', a tokenizer.json path, or 'train' "
                                   "(byte-level BPE with model.vocab_size tokens, trained on the training documents).")
    val_fraction: float = _help(0.05, "Share of documents held out for validation when preparing (split by document).")
    eval_batches: int = _help(8, "Validation batches per evaluation (0 = the whole validation split).")

    def __post_init__(self) -> None:
        if self.path and self.sources:
            raise ConfigError("data: set either `path` or `sources`, not both")
        for name, spec in self.sources.items():
            if not isinstance(spec, dict) or set(spec) - {"path", "weight"} or "path" not in spec:
                raise ConfigError(f"data.sources.{name}: expected {{path: DIR, weight: W}}, got {spec!r}")
        if self.seq_len < 1:
            raise ConfigError(f"data.seq_len must be positive, got {self.seq_len}")
        for entry in self.curriculum:
            if len(entry) != 2:
                raise ConfigError(f"data.curriculum entries are [step, seq_len], got {entry!r}")
        if self.curriculum and self.curriculum[0][0] != 0:
            raise ConfigError("data.curriculum must start at step 0")

    def schedule(self) -> list[tuple[int, int]]:
        """The curriculum as (start_step, seq_len) pairs (a constant seq_len is one pair)."""
        return [(int(s), int(t)) for s, t in self.curriculum] or [(0, self.seq_len)]

    @property
    def max_seq_len(self) -> int:
        return max(t for _, t in self.schedule())


@dataclass
class TrainConfig:
    """A training run. Top-level keys are the run; sections configure its parts."""

    run_dir: str = _help("runs/train", "Where metrics.jsonl, TensorBoard logs, checkpoints/ and the final model/ go.")
    max_steps: int = _help(1000, "Optimizer steps to run.")
    seed: int = _help(0, "Seed for initialisation, data order and dropout: same seed, same run.")
    batch_size: int = _help(16, "Rows per optimizer step: the global batch, whatever the number of processes.")
    micro_batch_size: int = _help(0, "Rows per forward/backward (0 = batch_size): smaller values accumulate gradients.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _help(
        "auto", "auto (bf16 where this device runs it measurably faster than fp32, else fp32; bf16 or fp16 on CUDA), "
                "fp32, bf16 (autocast on CPU and GPU) or fp16 (autocast + gradient scaler; CUDA only).")
    device: str = _help("auto", "auto (CUDA when available, else CPU), cpu, cuda or cuda:N.")
    compile: bool = _help(False, "Compile the model with torch.compile (ds.jit; falls back to eager with a warning).")
    gradient_checkpointing: bool = _help(False, "Recompute each block in backward: less activation memory, more time.")
    log_every: int = _help(10, "Write a metrics.jsonl record every N steps.")
    eval_every: int = _help(100, "Evaluate on the validation split every N steps (0 = only at the end).")
    time_limit_minutes: float = _help(0.0, "Stop (saving a checkpoint and the model) after this many minutes; 0 = no "
                                           "limit. With schedule.fit_time_limit the learning-rate schedule is planned "
                                           "to end at the limit.")
    progress: bool = _help(True, "Show a progress bar.")
    tensorboard: bool = _help(True, "Write TensorBoard scalars to run_dir/tensorboard.")
    metrics_port: int = _help(0, "Serve the logged records as Prometheus gauges (ds_train_loss, ...) on this port from "
                                 "rank 0 (0 = off; needs prometheus-client, the serve extra).")
    metrics_host: str = _help("127.0.0.1", "Address the metrics_port server binds (0.0.0.0 in a container, so "
                                           "Prometheus can scrape the pod).")
    model: ModelConfig = _help(ModelConfig, "The model: in a file or override, `preset` (tiny, small, mixtral-tiny, "
                                            "base, large) plus any ModelConfig field on top, e.g. n_routed_experts: 16.")
    vocab_from_tokenizer: bool = _help(True, "Size the model's vocabulary to the tokenizer's (model.vocab_size is then "
                                             "only the size a trained tokenizer gets). Defaults to false when the model "
                                             "section sets vocab_size itself.")
    data: DataConfig = _help(DataConfig, "The data section.")
    optimizer: OptimizerConfig = _help(OptimizerConfig, "The optimizer section (AdamW).")
    schedule: ScheduleConfig = _help(ScheduleConfig, "The learning-rate schedule section.")
    clip: ClipConfig = _help(ClipConfig, "The gradient clipping section.")
    checkpoint: CheckpointConfig = _help(CheckpointConfig, "The checkpoint section.")
    parallel: ParallelConfig = _help(ParallelConfig, "The parallel section (multi-process training via torchrun).")

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be 0 (off) or a port in 1..65535, got {self.metrics_port}")
        micro = self.micro_batch_size or self.batch_size
        if self.batch_size % micro:
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({micro})")
        if self.parallel.pp > 1 and self.parallel.pp_schedule == "1F1B" and self.batch_size // micro < self.parallel.pp:
            raise ConfigError(f"parallel.pp_schedule=1F1B needs at least pp={self.parallel.pp} micro-batches per step; "
                              f"batch_size/micro_batch_size = {self.batch_size // micro} (lower micro_batch_size, or "
                              f"use GPipe)")
        if isinstance(self.model, dict):  # TrainConfig(model={"preset": ..., ...}) built in Python
            if "vocab_size" in self.model:
                self.vocab_from_tokenizer = False
            self.model = model_from_section(self.model)

    def model_config(self) -> ModelConfig:
        """A copy of the ModelConfig this run trains (callers size its vocabulary to their tokenizer)."""
        return dataclasses.replace(self.model)

    @property
    def micro_batch(self) -> int:
        return self.micro_batch_size or self.batch_size


def model_from_section(section: dict[str, Any]) -> ModelConfig:
    """The ModelConfig a ``model:`` section names: its ``preset`` (default tiny) with the other keys on top;
    unknown keys are a ConfigError listing the valid ones."""
    fields = dict(section)
    name = fields.pop("preset", "tiny")
    if name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    try:
        return preset(name, **fields)
    except ConfigError as exc:
        raise ConfigError(f"model: {exc}; or `preset`") from exc


def load_train_config(path: Optional[str | Path] = None, overrides: list[str] | None = None) -> TrainConfig:
    """A TrainConfig from a YAML/JSON file (or the defaults) with ``key=value`` overrides applied.

    The ``model`` section is resolved as written (file, then ``model.*`` overrides): ``model.preset=base`` picks
    another preset under the fields the file sets, which a resolved ModelConfig could no longer tell apart."""
    data = read_mapping(path) if path is not None else {}
    if not isinstance(data, dict):
        return from_dict(TrainConfig, data)  # the error that names what the file holds instead of a mapping
    section = data.get("model") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"model: expected a mapping (preset + ModelConfig fields), got {section!r}")
    section, rest = dict(section), []
    for text in overrides or []:
        key, value = split_override(text)
        if key.startswith("model."):
            section[key.removeprefix("model.")] = value
        else:
            rest.append(text)
    if "vocab_size" in section:
        data.setdefault("vocab_from_tokenizer", False)
    config = from_dict(TrainConfig, {**data, "model": model_from_section(section)})
    return apply_overrides(config, rest)


def describe_fields(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field, sections expanded: the reference ``ds train --help`` prints."""
    rows = []
    for f in dataclasses.fields(cls):
        if cls is TrainConfig and f.name == "model":
            rows.append(("model.preset", repr("tiny"), f.metadata["help"]))
            for mf in dataclasses.fields(ModelConfig):
                rows.append((f"model.{mf.name}", repr(mf.default), "ModelConfig field (see docs/model.md)"))
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            rows.extend(describe_fields(type(default), prefix + f.name + "."))
            continue
        rows.append((prefix + f.name, repr(default), f.metadata.get("help", "")))
    return rows

