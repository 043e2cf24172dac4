"""The training CLI end to end, as a user runs it: tokenizer → prepare → train → eval → generate → info.

`ds train` runs as its own process (and is killed as one); the short commands around it run in this process
through typer's CliRunner (the same app, arguments and output, without a second's interpreter start-up each)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from typer.testing import CliRunner

import deepseek as ds
from deepseek.cli.main import app
from deepseek.data import byte_tokenizer, prepare, python_stdlib_dir

ROOT = Path(__file__).resolve().parents[1]


def run_ds(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "deepseek.cli.main", *map(str, args)], capture_output=True,
                            text=True, cwd=ROOT)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def run_ds_here(*args):
    """``ds <args>`` through the CLI app in this process; asserts it succeeded."""
    result = CliRunner().invoke(app, list(map(str, args)))
    assert result.exit_code == 0, result.output
    return result


def test_tokenizer_prepare_train_eval_generate_info(tmp_path):
    json_dir = python_stdlib_dir() / "json"
    tok = tmp_path / "tok.json"
    out = run_ds_here("tokenizer", "train", json_dir, "--out", tok, "--vocab-size", "320")
    assert "320 tokens" in out.stdout
    data = tmp_path / "data"
    out = run_ds_here("prepare", json_dir, "{stdlib}/email/*.py", "--out", data, "--tokenizer", tok, "--val-fraction", "0.2")
    assert "train:" in out.stdout and "val:" in out.stdout
    run = tmp_path / "run"
    out = run_ds("train", "configs/tiny.yaml", f"run_dir={run}", f"data.path={data}", "max_steps=8",
                 "log_every=4", "eval_every=4", "checkpoint.every=4", "seed=3", "model.n_routed_experts=16")
    assert "trained 8 steps" in out.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(records[0]) and any("val_loss" in r for r in records)
    assert (run / "tensorboard").is_dir() and any((run / "tensorboard").iterdir())
    model, tokenizer = ds.load(run / "model")
    assert model.config.n_routed_experts == 16 and tokenizer.get_vocab_size() == 320 == model.config.vocab_size
    out = run_ds_here("eval", run / "model", "--data", data, "--seq-len", "64")
    assert "loss:" in out.stdout and "ppl:" in out.stdout and "bits_per_byte:" in out.stdout
    out = run_ds_here("generate", run / "model", "def ", "--max-new-tokens", "8", "--seed", "0")
    assert out.stdout.startswith("def ")
    out = run_ds_here("info", run / "model")
    assert "active per token" in out.stdout


def test_train_help_documents_every_field():
    out = run_ds_here("train", "--help")
    for key in ("run_dir", "max_steps", "batch_size", "precision", "optimizer.lr", "schedule.warmup_steps",
                "clip.mode", "checkpoint.keep_last", "data.curriculum", "model.n_routed_experts"):
        assert key in out.stdout, key


def test_usage_and_runtime_errors_are_one_line_with_exit_codes(tmp_path, ds_main):
    bad_key = ds_main("train", "configs/tiny.yaml", "max_step=3")
    assert bad_key.returncode == 2 and "valid keys" in bad_key.stderr and "Traceback" not in bad_key.stderr
    missing = ds_main("train", "configs/tiny.yaml", f"run_dir={tmp_path}/r", f"data.path={tmp_path}/none",
                      "data.prepare_from=[]")
    assert missing.returncode == 1 and "not a prepared data directory" in missing.stderr
    assert "Traceback" not in missing.stderr
    debug = run_ds("--debug", "train",  # a real process: --debug lets the traceback out "configs/tiny.yaml", f"run_dir={tmp_path}/r", f"data.path={tmp_path}/none",
                   "data.prepare_from=[]", check=False)
    assert "Traceback" in debug.stderr


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    """SIGKILL a `ds train` after its first checkpoint; `--resume` ends with the uninterrupted run's weights."""
    data = tmp_path / "data"  # `ds prepare` and `ds train` as CLI runs are the test above's; here: the kill
    prepare([python_stdlib_dir() / "json"], byte_tokenizer(), data, val_fraction=0.2, progress=False)
    common = ["configs/tiny.yaml", f"data.path={data}", "max_steps=24", "checkpoint.every=8", "eval_every=0",
              "data.seq_len=64", "progress=false"]
    # the uninterrupted run, alongside the one to be killed (their start-ups overlap on the two cores)
    reference = subprocess.Popen([sys.executable, "-m", "deepseek.cli.main", "train", *common,
                                  f"run_dir={tmp_path / 'a'}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen([sys.executable, "-m", "deepseek.cli.main", "train", *common,
                               f"run_dir={tmp_path / 'b'}", "checkpoint.keep_last=5"], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "b" / "checkpoints" / "step-00000008" / "manifest.json"
    deadline = time.monotonic() + 120
    while not first.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # polling for a file, not timing the test
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    _, reference_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, reference_err
    out = run_ds("train", *common, f"run_dir={tmp_path / 'b'}", "--resume")
    assert "trained 24 steps" in out.stdout
    a, _ = ds.load(tmp_path / "a" / "model")
    b, _ = ds.load(tmp_path / "b" / "model")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
