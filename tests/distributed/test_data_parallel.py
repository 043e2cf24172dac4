"""Data parallelism (DDP over gloo, 2 processes under torchrun) gives the 1-process run's losses and weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deepseek as ds
from deepseek.config import ConfigError
from deepseek.data import byte_tokenizer, prepare, python_stdlib_dir
from deepseek.dist.launch import torchrun_command
from deepseek.train.lm import train_lm
from deepseek.train.trainer_config import load_train_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "json"
    prepare([str(python_stdlib_dir() / "json")], byte_tokenizer(), out, val_fraction=0.15, progress=False)
    return out


def overrides(run_dir, data_dir, *extra):
    # micro_batch_size=4: two micro-batches per step (no_sync on the first); a sigmoid router: its aux-loss-free
    # bias update needs the global expert load, all-reduced over the ranks.
    return [f"run_dir={run_dir}", f"data.path={data_dir}", "max_steps=10", "batch_size=8", "micro_batch_size=4",
            "precision=fp32", "device=cpu", "log_every=1", "eval_every=0", "data.seq_len=64", "data.eval_batches=1",
            "progress=false", "tensorboard=false", "optimizer.lr=3e-3", "schedule.warmup_steps=2",
            "checkpoint.every=5", "model.router=sigmoid", "model.bias_update_speed=0.01", *extra]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "ddp.yaml"
    path.write_text("seed: 0\n")
    return path


def run_cmd(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 11))  # each step once: only rank 0 logged
    return [r["loss"] for r in train]


def files(run_dir):
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_dir):
    run_dir = tmp_path_factory.mktemp("single") / "run"
    torch.set_num_threads(1)
    train_lm(load_train_config(None, overrides(run_dir, data_dir)))
    return run_dir


def test_two_processes_match_one(tmp_path, data_dir, single, config_file):
    run_dir = tmp_path / "ddp"
    # `ds train --nproc 2` re-launches itself under torchrun --standalone
    run_cmd([sys.executable, "-m", "deepseek.cli.main", "train", config_file, "--nproc", "2", *overrides(run_dir, data_dir)])
    for a, b in zip(losses(run_dir), losses(single), strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    ddp_model, _ = ds.load(run_dir / "model")
    one_model, _ = ds.load(single / "model")
    ddp_state, one_state = ddp_model.state_dict(), one_model.state_dict()
    assert ddp_state.keys() == one_state.keys()
    for key in one_state:
        torch.testing.assert_close(ddp_state[key], one_state[key], atol=1e-5, rtol=0, msg=key)
    biases = [v for k, v in ddp_state.items() if k.endswith("expert_bias")]
    assert biases and any(b.abs().sum() > 0 for b in biases)  # the balancing update did run
    assert files(run_dir) == files(single)  # the same files: nothing extra from rank 1


def test_fp16_gradient_compression_with_plain_torchrun(tmp_path, data_dir, single, config_file):
    run_dir = tmp_path / "fp16"
    run_cmd(torchrun_command(2, ["train", str(config_file), *overrides(run_dir, data_dir, "parallel.grad_compression=fp16")]))
    got, want = losses(run_dir), losses(single)
    assert got[0] == pytest.approx(want[0], abs=1e-5)  # the first forward precedes any compressed gradient
    assert got != want and all(abs(a - b) < 0.05 for a, b in zip(got, want))


def test_parallel_config_errors():
    with pytest.raises(ConfigError, match="valid keys: dp_replicate, grad_compression, timeout_s"):
        load_train_config(None, ["parallel.tp=2"])
    with pytest.raises(ConfigError, match="grad_compression"):
        load_train_config(None, ["parallel.grad_compression=int4"])
    cfg = load_train_config(None, ["parallel.dp_replicate=3"])
    with pytest.raises(ConfigError, match="dp_replicate=3 but torchrun started 2"):
        cfg.parallel.data_parallel_size(2)
    assert cfg.parallel.data_parallel_size(3) == 3


def test_bf16_compression_on_gloo_is_a_clear_error(tmp_path, data_dir, config_file):
    result = subprocess.run(
        torchrun_command(2, ["train", str(config_file), *overrides(tmp_path / "bf16", data_dir, "parallel.grad_compression=bf16",
                                                 "max_steps=1")]),
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240)
    assert result.returncode != 0
    assert "grad_compression=bf16 needs the NCCL backend" in result.stdout + result.stderr


HUNG_RANK = """
import time, torch, torch.distributed as dist
from deepseek.dist import destroy, init_distributed, rank_errors
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
