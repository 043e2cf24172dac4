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
    """Run ``ds <args>`` under torchrun on this machine; returns torchrun's exit status (0, or 1 when a rank failed
    for good).

    torchrun's launcher (``torch.distributed.run``: the elastic agent, its rendezvous, restarts and signal
    handling) runs in this process, as the ``torchrun`` script would in its own: one interpreter start (~1.5 s,
    most of it ``import torch``) fewer before the ranks start. ``env``: run it in a subprocess with that
    environment instead."""
    command = torchrun_command(nproc, args, max_restarts=max_restarts)
    if env is not None:
        return subprocess.run(command, env=env).returncode
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(command[3:]))  # the arguments after `python -m torch.distributed.run`
    except ChildFailedError as exc:  # what torchrun prints before exiting 1: which rank failed, how, where to look
        print(exc.format_msg(), file=sys.stderr)
        return 1
    return 0
