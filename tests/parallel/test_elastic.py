"""Elastic restarts: SIGKILL a worker of `ds train --nproc 2 --max-restarts 1` mid-run; torchrun restarts the
job, it resumes from its newest checkpoint, and the loss curve and the model equal an uninterrupted run's."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .runs import ROOT, assert_same_model, losses, overrides, run_env, train_torchrun

STEPS = 30
EXTRA = (f"max_steps={STEPS}", "checkpoint.every=4")


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc: ``ds`` -> torchrun -> workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def worker_of_rank(pid: int, rank: int) -> int:
    for child in descendants(pid):
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b"".join(environ):
            return child
    raise AssertionError(f"no worker with RANK={rank} under pid {pid}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir, config_file) -> Path:
    """The uninterrupted 2-process run both victims are compared with (run once)."""
    return train_torchrun(2, config_file, tmp_path_factory.mktemp("elastic") / "uninterrupted", data_dir, *EXTRA)


@pytest.mark.dist_slow
@pytest.mark.parametrize("victim", [0, 1])
def test_sigkill_a_worker_and_the_restarted_job_ends_like_an_uninterrupted_one(tmp_path, data_dir, config_file,
                                                                                 reference, victim):

    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "deepseek.cli.main", "train", str(config_file), "--nproc", "2", "--max-restarts", "1",
           *overrides(run_dir, data_dir, *EXTRA)]
    job = subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while logged_steps(run_dir) < 9:  # past the checkpoint of step 8, well before the end
            assert job.poll() is None, job.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the run never reached step 9"
            time.sleep(0.02)  # polling the metrics file, not synchronisation
        killed_at = logged_steps(run_dir)
        os.kill(worker_of_rank(job.pid, victim), signal.SIGKILL)
        output, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, output[-3000:]
    assert killed_at < STEPS
    assert "torchrun restart 1: resuming from the newest checkpoint" in output
    assert losses(run_dir, STEPS) == pytest.approx(losses(reference, STEPS), abs=1e-6)
    assert_same_model(run_dir / "model", reference / "model", atol=1e-6)
