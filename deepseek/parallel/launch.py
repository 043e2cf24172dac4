"""Starting a torchrun job on this machine: ``ds train --nproc N`` re-launches itself under torchrun.

What each rank then runs is the training package's business (``train_lm_distributed``): this module only starts it.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Optional


def torchrun_command(nproc: int, args: list[str], *, max_restarts: int = 0) -> list[str]:
    """The torchrun command line that runs ``ds <args>`` on ``nproc`` local processes (the venv's torchrun)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    if max_restarts:
        cmd.append(f"--max-restarts={max_restarts}")
    return [*cmd, "-m", "deepseek.cli.main", *args]


def relaunch(nproc: int, args: list[str], *, max_restarts: int = 0, env: Optional[dict] = None) -> int:
    """Run ``ds <args>`` under torchrun on this machine; returns torchrun's exit status."""
    return subprocess.run(torchrun_command(nproc, args, max_restarts=max_restarts), env=env).returncode
