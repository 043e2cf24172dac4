"""The ``parallel:`` section of a run: how it is spread over processes, and the device mesh's dimensions.

Read by the plans (:mod:`deepseek.parallel.plan`) and by the training entry points; it knows nothing of training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from deepseek.config import ConfigError


def _help(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


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
