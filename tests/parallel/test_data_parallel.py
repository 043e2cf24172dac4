"""Data parallelism (DDP over gloo, 2 processes under torchrun) gives the 1-process run's losses and weights."""

import os
import subprocess
import sys

import pytest

import deepseek as ds
from deepseek.config import ConfigError
from deepseek.parallel.launch import torchrun_command
from deepseek.train.config import load_train_config
from .runs import ROOT, assert_same_model, files, losses, overrides, run_cmd, train_single


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_dir):
    return train_single(tmp_path_factory.mktemp("single") / "run", data_dir)


def test_two_processes_match_one(tmp_path, data_dir, single, config_file):
    run_dir = tmp_path / "ddp"
    # `ds train --nproc 2` re-launches itself under torchrun --standalone
    run_cmd([sys.executable, "-m", "deepseek.cli.main", "train", config_file, "--nproc", "2", *overrides(run_dir, data_dir)])
    for a, b in zip(losses(run_dir), losses(single), strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    assert_same_model(run_dir / "model", single / "model")
    biases = [v for k, v in ds.load(run_dir / "model")[0].state_dict().items() if k.endswith("expert_bias")]
    assert biases and any(b.abs().sum() > 0 for b in biases)  # the balancing update did run
    assert files(run_dir) == files(single)  # the same files: nothing extra from rank 1


def test_fp16_gradient_compression_with_plain_torchrun(tmp_path, data_dir, single, config_file):
    run_dir = tmp_path / "fp16"
    # plain `torchrun -m deepseek.train CONFIG key=value …`, as torchrun users write it
    run_cmd([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "deepseek.train",
             config_file, *overrides(run_dir, data_dir, "parallel.grad_compression=fp16")])
    got, want = losses(run_dir), losses(single)
    assert got[0] == pytest.approx(want[0], abs=1e-5)  # the first forward precedes any compressed gradient
    assert got != want and all(abs(a - b) < 0.05 for a, b in zip(got, want))


def test_parallel_config_errors():
    with pytest.raises(ConfigError, match="valid keys: mode, dp_replicate, dp_shard, tp, ep, pp"):
        load_train_config(None, ["parallel.sp=2"])
    with pytest.raises(ConfigError, match="grad_compression"):
        load_train_config(None, ["parallel.grad_compression=int4"])
    cfg = load_train_config(None, ["parallel.dp_replicate=3"])
    with pytest.raises(ConfigError, match="dp_replicate=3 .* = 3 processes, but torchrun started 2"):
        cfg.parallel.data_parallel_size(2)
    assert cfg.parallel.data_parallel_size(3) == 3
    cfg = load_train_config(None, ["parallel.tp=2", "parallel.dp_shard=2"])  # dp_replicate=-1 fills the rest
    assert cfg.parallel.degrees(8) == {"pp": 1, "dp_replicate": 2, "dp_shard": 2, "ep": 1, "tp": 2}
    assert cfg.parallel.data_parallel_size(8) == 4
    with pytest.raises(ConfigError, match="does not divide the 6 processes"):
        cfg.parallel.degrees(6)


def test_bf16_compression_on_gloo_is_a_clear_error(tmp_path, data_dir, config_file):
    result = subprocess.run(
        torchrun_command(2, ["train", str(config_file), *overrides(tmp_path / "bf16", data_dir, "parallel.grad_compression=bf16",
                                                 "max_steps=1")]),
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240)
    assert result.returncode != 0
    assert "grad_compression=bf16 needs the NCCL backend" in result.stdout + result.stderr


HUNG_RANK = """
import time, torch, torch.distributed as dist
from deepseek.parallel import destroy, init_distributed, rank_errors
env = init_distributed(timeout_s=2)
try:
    with rank_errors(2):
        if env.rank == 1:
            time.sleep(8)  # rank 1 hangs
        dist.all_reduce(torch.zeros(1))
finally:
    destroy()
"""


def test_a_hung_rank_is_an_error_naming_the_rank(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(HUNG_RANK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert result.returncode != 0
    assert "CollectiveTimeout: rank 0 of 2: a collective did not complete within parallel.timeout_s=2s" in (
        result.stdout + result.stderr)
