"""`ds quickstart` end to end, as the main job runs it, on a slice of the corpus and a short time budget."""

import json
import subprocess
import sys
from pathlib import Path

import deepseek as ds
from deepseek.cli.quickstart import WIDE_MODEL_MIN_TOKENS, plan_for_speed, user_first, versus_gzip

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_trains_compares_with_gzip_and_leaves_a_model(tmp_path):
    run = tmp_path / "qs"
    # A 3-second budget on the json and email packages with the tiny model: every stage runs, in seconds.
    result = subprocess.run(
        [sys.executable, "-m", "deepseek.cli.main", "quickstart", "--run-dir", str(run), "--no-serve",
         'data.prepare_from=["{stdlib}/json/*.py", "{stdlib}/email/*.py"]', "data.val_fraction=0.2",
         "model.preset=tiny", "model.d_model=64", "model.n_heads=4", "model.ffn_dim=256", "model.moe_ffn_dim=128",
         "model.vocab_size=512", "time_limit_minutes=0.05", "progress=false",
         "data.eval_batches=4"],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    out = result.stdout
    assert result.returncode == 0, result.stderr[-3000:]
    assert "precision:" in out and "tok/s here" in out            # what it chose, and the measured speed
    assert "bits per byte" in out and "gzip -9" in out and "lzma -9e" in out
    assert "bits than gzip" in out or "same as gzip" in out         # the comparison said in words
    assert "def read_lines(path):" in out and "class Stack:" in out   # completions
    model, tokenizer = ds.load(run / "model")
    assert model.config.d_model == 64 and tokenizer.get_vocab_size() <= 512
    info = json.loads((run / "trainer.json").read_text())
    assert info["precision"]["precision"] in ("fp32", "bf16") and info["time_budget"]["plans"]
    assert (run / "config.yaml").is_file()  # the effective config, for `ds train ... --resume`


def test_the_plan_follows_the_measured_speed():
    slow, fast, very_fast = plan_for_speed(1500, 9), plan_for_speed(9000, 9), plan_for_speed(50_000, 9)
    assert slow.expected_tokens < fast.expected_tokens and slow.expected_steps < fast.expected_steps
    assert not any(o.startswith("model.") for o in slow.overrides + fast.overrides)  # configs/quickstart.yaml's model
    assert very_fast.expected_tokens >= WIDE_MODEL_MIN_TOKENS and "model.d_model=256" in very_fast.overrides
    curriculum = next(o for o in slow.overrides if o.startswith("data.curriculum="))
    assert curriculum.startswith("data.curriculum=[[0, 64], [") and curriculum.endswith(", 256]]")
    assert "tok/s here" in slow.description


def test_the_users_overrides_win_over_the_plan():
    planned = ["batch_size=16", "model.d_model=192", "eval_every=50"]
    assert user_first(planned, ["batch_size=8"]) == ["model.d_model=192", "eval_every=50"]
    assert user_first(planned, ["model.preset=tiny"]) == ["batch_size=16", "eval_every=50"]


def test_the_gzip_comparison_cannot_be_misread():
    assert versus_gzip(1.5, 1.9) == "21% fewer bits than gzip"
    assert versus_gzip(2.6, 1.9) == "37% more bits than gzip (worse)"
    assert versus_gzip(1.9, 1.9) == "same as gzip"
