"""Running ``train_lm`` as one rank of a torchrun job, and ``ds train --nproc N``'s re-launch under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional

from deepseek.parallel.env import barrier, destroy, init_distributed, rank_errors
from deepseek.parallel.plan import build_parallelism
from deepseek.train.trainer import TrainResult, resolve_device
from deepseek.train.config import TrainConfig


def train_lm_distributed(config: TrainConfig) -> TrainResult:
    """``train_lm`` on this rank of a torchrun job: process group, the layout, this rank's rows, clean teardown."""
    from deepseek.train.lm import _train_lm, ensure_prepared

    env = init_distributed(timeout_s=config.parallel.timeout_s)
    config.parallel.degrees(env.world_size)  # a layout that does not fit fails before any work
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restart not in ("", "0"):
        config.checkpoint.resume = True  # a restarted job continues from its last checkpoint
        if env.is_main:
            print(f"torchrun restart {restart}: resuming from the newest checkpoint in {config.run_dir}",
                  file=sys.stderr, flush=True)
    try:
        with rank_errors(config.parallel.timeout_s):
            parallel = build_parallelism(config.parallel, env, resolve_device(config.device))
            if env.is_main:
                ensure_prepared(config.data, config.model_config().vocab_size, progress=config.progress)
            barrier()
            return _train_lm(config, parallel=parallel)
    finally:
        destroy()


def torchrun_command(nproc: int, args: list[str], *, max_restarts: int = 0) -> list[str]:
    """The torchrun command line that runs ``ds <args>`` on ``nproc`` local processes (the venv's torchrun)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    if max_restarts:
        cmd.append(f"--max-restarts={max_restarts}")
    return [*cmd, "-m", "deepseek.cli.main", *args]


def relaunch(nproc: int, args: list[str], *, max_restarts: int = 0, env: Optional[dict] = None) -> int:
    """Run ``ds <args>`` under torchrun on this machine; returns torchrun's exit status."""
    return subprocess.run(torchrun_command(nproc, args, max_restarts=max_restarts), env=env).returncode
