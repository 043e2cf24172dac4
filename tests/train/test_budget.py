"""A time-limited run plans its schedule from measured step times: the cosine ends at the limit (fake clocks)."""

import json

import pytest
import torch
from torch import nn

from deepseek.train.budget import TimeBudget
from deepseek.train.optim import lr_multiplier
from deepseek.train.trainer import Trainer
from deepseek.train.config import load_train_config


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def batches():
    gen = torch.Generator().manual_seed(0)
    while True:
        x = torch.randn(8, 4, generator=gen)
        yield x, x.sum(dim=1, keepdim=True)


def timed_trainer(tmp_path, clock, seconds_per_step, *overrides, eval_seconds=None, work=None):
    """A tiny regression whose every training step takes ``seconds_per_step(step)`` seconds of ``clock``."""
    cfg = load_train_config(None, [f"run_dir={tmp_path}", "max_steps=10000", "batch_size=8", "precision=fp32",
                                   "time_limit_minutes=1", "eval_every=0", "checkpoint.every=0", "progress=false",
                                   "tensorboard=false", "schedule.warmup_steps=5", "optimizer.lr=1e-2",
                                   "log_every=1", *overrides])
    calls = {"n": 0}

    def loss_fn(model, batch):
        clock.now += seconds_per_step(calls["n"])
        calls["n"] += 1
        x, y = batch
        return nn.functional.mse_loss(model(x), y)

    def eval_fn(model):
        clock.now += eval_seconds
        return {"val_loss": 0.0}

    return Trainer(nn.Linear(4, 1), cfg, batches=batches(), loss_fn=loss_fn, throughput_unit="samples/s",
                   eval_fn=eval_fn if eval_seconds is not None else None, clock=clock, work_per_step=work)


def test_the_schedule_ends_at_the_time_limit(tmp_path):
    clock = FakeClock()
    trainer = timed_trainer(tmp_path, clock, lambda step: 1.0)  # 1 s per step, 60 s allowed
    result = trainer.fit()
    # 60 s less the 3 % safety = 58.2 s; the final evaluation and save are reserved (guessed 3 + 1 steps): 54 steps.
    assert trainer.planned_steps == result.step == 54 and not result.stopped_early
    assert clock.now <= 60
    assert lr_multiplier(53, warmup_steps=5, max_steps=54, decay="cosine", min_lr_ratio=0.1) == pytest.approx(0.1, abs=0.001)
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]
    assert lrs[-1] == pytest.approx(1e-2 * 0.1, rel=0.02)  # the last step runs at the floor of the cosine
    info = json.loads((tmp_path / "trainer.json").read_text())
    assert info["planned_steps"] == 54 and info["time_budget"]["plans"][0]["steps"] == 54
    assert info["precision"]["precision"] == "fp32"


def test_the_budget_never_plans_past_max_steps(tmp_path):
    clock = FakeClock()
    trainer = timed_trainer(tmp_path, clock, lambda step: 0.01, "max_steps=30")
    result = trainer.fit()
    assert result.step == 30 and trainer.planned_steps == 30


def test_a_run_without_fit_time_limit_only_stops_at_the_limit(tmp_path):
    clock = FakeClock()
    trainer = timed_trainer(tmp_path, clock, lambda step: 1.0, "schedule.fit_time_limit=false")
    result = trainer.fit()
    assert result.stopped_early and trainer.planned_steps == 10000 and result.step == 61


def test_measured_evaluations_revise_the_plan(tmp_path):
    clock = FakeClock()
    trainer = timed_trainer(tmp_path, clock, lambda step: 1.0, "eval_every=10", eval_seconds=5.0)
    result = trainer.fit()
    plans = trainer_plans(tmp_path)
    assert len(plans) >= 2  # first plan guesses an evaluation at 3 steps; it is re-planned once one was timed
    # Measured: 1 s/step, 5 s per evaluation: n + 5 * (evaluations before the end) + 5 (final) + 1 (save) <= 58.2.
    n = result.step
    assert n + 5 * ((n - 1) // 10) + 6 <= 58.2 < (n + 1) + 5 * (n // 10) + 6
    assert clock.now <= 60 and not result.stopped_early


def trainer_plans(run_dir):
    return json.loads((run_dir / "trainer.json").read_text())["time_budget"]["plans"]


def test_a_curriculum_phase_that_costs_more_is_planned_for():
    # 0.01 s per token; 128 tokens per step for 20 steps, then 256: steps take 1.28 s, then 2.56 s.
    work = lambda step: 128.0 if step < 20 else 256.0  # noqa: E731
    budget = TimeBudget(100.0, 10_000, work=work)
    elapsed = 0.0
    for step in range(8):
        elapsed += 0.01 * work(step)
        budget.record_step(step, 0.01 * work(step))
    assert budget.wants_plan()
    plan = budget.plan_steps(8, elapsed)
    # 97 s allowed; 20 steps of 1.28 s = 25.6 s, then 2.56 s a step; final evaluation + save guessed as 4 steps.
    expected = 20 + int((97.0 - 25.6 - 4 * 1.28) // 2.56)
    assert plan.steps == expected and plan.predicted_s <= 97.0
    assert not budget.wants_plan()
    for step in range(8, 28):  # the 256-token phase is measured: the plan is revised with its real cost
        budget.record_step(step, 0.011 * work(step))
    assert budget.wants_plan()
    assert budget.plan_steps(28, 25.6 + 8 * 2.816).steps < expected


def test_the_precision_trial_leaves_the_model_and_the_rng_alone():
    from deepseek.hardware import choose_precision, hardware_profile
    from deepseek.train.calibrate import precision_by_trial

    profile = hardware_profile(measure=False)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(torch.randn(64, 16), torch.randn(64, 1)) for _ in range(3)]
    rng = torch.get_rng_state()
    choice = precision_by_trial(model, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]), batches,
                                choose_precision("fp32", profile), choose_precision("bf16", profile))
    assert choice.precision in ("fp32", "bf16")
    assert "measured this model's training step on 2 batches: fp32" in choice.reason
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
