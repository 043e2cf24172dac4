"""The process environment torchrun sets up, and the process group on top of it.

torchrun exports ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` (and ``MASTER_ADDR``/``MASTER_PORT``); a plain
``python`` run has none of them and is rank 0 of 1.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as torch_dist

from deepseek.config import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistEnv:
    """RANK / LOCAL_RANK / WORLD_SIZE as torchrun exports them (rank 0 of 1 outside torchrun)."""
    try:
        return DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                       int(os.environ.get("WORLD_SIZE", 1)))
    except ValueError as exc:
        raise ConfigError(f"malformed torchrun environment: {exc}") from exc


def is_main_process() -> bool:
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank() == 0
    return dist_env().is_main


def init_distributed(backend: Optional[str] = None, timeout_s: float = 600.0) -> DistEnv:
    """Join the process group torchrun prepared: gloo on CPU, NCCL when CUDA is available.

    ``timeout_s`` bounds every collective: a rank that hangs or dies makes the others fail with an
    error naming the rank (instead of a silent hang). A no-op outside torchrun (world size 1).
    """
    env = dist_env()
    if not env.is_distributed or torch_dist.is_initialized():
        return env
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        store = _attempt_store(env, timeout)
        if store is None:
            torch_dist.init_process_group(backend, timeout=timeout)
        else:
            torch_dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout)
    except Exception as exc:  # rendezvous failures: say who we are
        raise RuntimeError(f"rank {env.rank}/{env.world_size}: could not join the process group "
                           f"({backend}, timeout {timeout_s:g}s): {exc}") from exc
    return env


def _attempt_store(env: DistEnv, timeout: datetime.timedelta) -> Optional[torch_dist.Store]:
    """The torchrun agent's store, with keys private to this restart attempt (None outside torchrun).

    torch 2.13's env:// init reuses the agent's TCPStore across restarts without a per-attempt prefix
    ("we create a new TCPStore for every retry"; with ``--standalone`` it is the same store and port), so the
    restarted workers read the dead workers' gloo addresses and fail with "connectFullMesh … Connection
    refused". Prefixing the keys with the attempt makes every restart rendezvous afresh (tested here).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = torch_dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size,
                          is_master=False, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return torch_dist.PrefixStore(f"/deepseek/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/attempt_{attempt}", store)


def tensor_device(device: torch.device) -> torch.device:
    """Where small collective tensors live: the GPU for NCCL, the CPU for gloo."""
    return device if device.type == "cuda" else torch.device("cpu")


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within ``parallel.timeout_s``: some rank hung, died or is very slow."""


@contextlib.contextmanager
def rank_errors(timeout_s: float):
    """Re-raise a collective timeout as :class:`CollectiveTimeout` naming this rank (torch's own message
    names neither the rank nor the setting to change)."""
    try:
        yield
    except RuntimeError as exc:
        text = str(exc)
        if isinstance(exc, CollectiveTimeout) or not ("Timed out" in text or "timed out" in text
                                                      or "Timeout" in text):
            raise
        env = dist_env()
        raise CollectiveTimeout(f"rank {env.rank} of {env.world_size}: a collective did not complete within "
                                f"parallel.timeout_s={timeout_s:g}s (another rank hung, died or is slow): "
                                f"{text.splitlines()[0] if text else type(exc).__name__}") from exc


def barrier() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()


def destroy() -> None:
    """Destroy the process group. Drop every DDP module first (``del`` the references): destroying the group
    while a DDP module is still alive aborts rank 0 ("terminate called without an active exception")."""
    gc.collect()  # DDP reducers that only cycles kept alive go now, before their process group
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
