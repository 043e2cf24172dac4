"""The training config: one dataclass, loaded from YAML, with ``key=value`` overrides.

    ds train configs/tiny.yaml run_dir=runs/r max_steps=20 seed=3 model.n_routed_experts=16

Every field carries its help text in ``metadata["help"]``: ``ds train --help`` prints them all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from deepseek.config import ConfigError, apply_overrides, load_file
from deepseek.models.config import PRESETS, ModelConfig, preset
from deepseek.train.config import CheckpointConfig, ClipConfig, OptimizerConfig, ScheduleConfig


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


MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "ep", "tp")  # outermost to innermost on the device mesh


@dataclass
class ParallelConfig:
    """How the run is spread over processes (launched by torchrun; see docs/distributed.md).

    The degrees multiply to the number of processes: ``pp * dp_replicate * dp_shard * ep * tp == WORLD_SIZE``.
    Data-parallel ranks (``dp_replicate * dp_shard * ep`` of them) each take their share of the global batch;
    tensor- and pipeline-parallel ranks of one data-parallel rank see the same rows.
    """

    mode: Literal["sync", "parameter_server"] = _help(
        "sync", "sync: every step is one synchronous step of all ranks (the degrees below); parameter_server: "
                "asynchronous workers push gradients to a server (docs/parameter_server.md).")
    dp_replicate: int = _help(-1, "Data-parallel replicas (DDP, or HSDP replicas with dp_shard). -1 = whatever the "
                                  "other degrees leave of WORLD_SIZE.")
    dp_shard: int = _help(1, "Fully sharded data parallelism (FSDP2 fully_shard, ZeRO-3 style): parameters, "
                             "gradients and optimizer state sharded over this many ranks.")
    tp: int = _help(1, "Tensor parallelism: attention heads, MLP and expert widths split over this many ranks (DTensor).")
    ep: int = _help(1, "Expert parallelism: routed experts split over this many ranks, tokens exchanged by all-to-all.")
    pp: int = _help(1, "Pipeline parallelism: the layers cut into this many stages (torch.distributed.pipelining).")
    pp_schedule: Literal["1F1B", "GPipe"] = _help("1F1B", "Pipeline schedule; micro-batches = batch_size / "
                                                          "micro_batch_size per data-parallel rank.")
    grad_compression: Literal["none", "fp16", "bf16", "powersgd"] = _help(
        "none", "Gradient all-reduce compression (DDP comm hook): none, fp16, powersgd, or bf16 (NCCL only).")
    timeout_s: float = _help(600.0, "Collective timeout in seconds: a hung or dead rank fails the run, naming "
                                    "the rank, instead of hanging it.")
    staleness: int = _help(4, "parameter_server: the most parameter versions a pushed gradient may lag behind; "
                              "staler gradients are dropped.")
    ps_lease_s: float = _help(60.0, "parameter_server: a worker silent this long is declared lost and its batch "
                                    "re-queued (workers on the server's machine are also detected at once by pid).")
    checkpoint_format: Literal["auto", "sharded", "plain"] = _help(
        "auto", "Checkpoints under torchrun: sharded (every rank writes its shards with torch.distributed.checkpoint; "
                "resumes on any number of ranks), plain (rank 0 writes the whole model), or auto: sharded when "
                "dp_shard, tp, ep or pp > 1.")

    def __post_init__(self) -> None:
        if self.mode not in ("sync", "parameter_server"):
            raise ConfigError(f"parallel.mode: unknown {self.mode!r}; valid: sync, parameter_server")
        if self.dp_replicate == 0 or self.dp_replicate < -1:
            raise ConfigError(f"parallel.dp_replicate must be positive or -1 (the rest), got {self.dp_replicate}")
        for name in ("dp_shard", "tp", "ep", "pp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name} must be positive, got {getattr(self, name)}")
        if self.pp_schedule not in ("1F1B", "GPipe"):
            raise ConfigError(f"parallel.pp_schedule: unknown {self.pp_schedule!r}; valid: 1F1B, GPipe")
        if self.grad_compression not in ("none", "fp16", "bf16", "powersgd"):
            raise ConfigError(f"parallel.grad_compression: unknown {self.grad_compression!r}; "
                              f"valid: none, fp16, bf16, powersgd")
        if self.timeout_s <= 0:
            raise ConfigError(f"parallel.timeout_s must be positive, got {self.timeout_s}")
        if self.staleness < 0:
            raise ConfigError(f"parallel.staleness must be >= 0, got {self.staleness}")
        if self.ps_lease_s <= 0:
            raise ConfigError(f"parallel.ps_lease_s must be positive, got {self.ps_lease_s}")
        if self.checkpoint_format not in ("auto", "sharded", "plain"):
            raise ConfigError(f"parallel.checkpoint_format: unknown {self.checkpoint_format!r}; valid: auto, sharded, plain")

    def degrees(self, world_size: int) -> dict[str, int]:
        """Every mesh dimension's size on ``world_size`` processes (``dp_replicate=-1`` filled in), checked."""
        others = self.pp * self.dp_shard * self.ep * self.tp
        replicate = self.dp_replicate
        if replicate == -1:
            if world_size % others:
                raise ConfigError(f"parallel: pp*dp_shard*ep*tp = {others} does not divide the {world_size} "
                                  f"processes torchrun started")
            replicate = world_size // others
        sizes = {"pp": self.pp, "dp_replicate": replicate, "dp_shard": self.dp_shard, "ep": self.ep, "tp": self.tp}
        if replicate * others != world_size:
            layout = " * ".join(f"{k}={v}" for k, v in sizes.items())
            raise ConfigError(f"parallel: {layout} = {replicate * others} processes, but torchrun started "
                              f"{world_size}")
        return sizes

    def data_parallel_size(self, world_size: int) -> int:
        """Ranks that take distinct rows of each global batch: ``dp_replicate * dp_shard * ep``."""
        sizes = self.degrees(world_size)
        return sizes["dp_replicate"] * sizes["dp_shard"] * sizes["ep"]


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
    model: dict[str, Any] = _help({"preset": "tiny"}, "The model: `preset` (tiny, small, mixtral-tiny, base, large) "
                                                      "plus any ModelConfig field, e.g. n_routed_experts: 16.")
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
        micro = self.micro_batch_size or self.batch_size
        if self.batch_size % micro:
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({micro})")
        if self.parallel.pp > 1 and self.parallel.pp_schedule == "1F1B" and self.batch_size // micro < self.parallel.pp:
            raise ConfigError(f"parallel.pp_schedule=1F1B needs at least pp={self.parallel.pp} micro-batches per step; "
                              f"batch_size/micro_batch_size = {self.batch_size // micro} (lower micro_batch_size, or "
                              f"use GPipe)")
        self.model_config()  # unknown model keys fail here, with the valid ones listed

    def model_config(self) -> ModelConfig:
        """The ModelConfig this run trains: the preset with the section's fields on top."""
        fields = dict(self.model)
        name = fields.pop("preset", "tiny")
        if name not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        try:
            return preset(name, **fields)
        except ConfigError as exc:
            raise ConfigError(f"model: {exc}; or `preset`") from exc

    @property
    def micro_batch(self) -> int:
        return self.micro_batch_size or self.batch_size


def load_train_config(path: Optional[str | Path] = None, overrides: list[str] | None = None) -> TrainConfig:
    """A TrainConfig from a YAML/JSON file (or the defaults) with ``key=value`` overrides applied."""
    config = load_file(TrainConfig, path) if path is not None else TrainConfig()
    return apply_overrides(config, overrides or [])


def describe_fields(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field, sections expanded: the reference ``ds train --help`` prints."""
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            rows.extend(describe_fields(type(default), prefix + f.name + "."))
            continue
        rows.append((prefix + f.name, repr(default), f.metadata.get("help", "")))
        if cls is TrainConfig and f.name == "model":
            for mf in dataclasses.fields(ModelConfig):
                rows.append((f"model.{mf.name}", repr(mf.default), "ModelConfig field (see docs/model.md)"))
    return rows

