"""The training loop on the tiny preset: loss falls, resume is exact, precision and balancing are wired."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import deepseek as ds
from deepseek.config import ConfigError
from deepseek.data import byte_tokenizer
from deepseek.train.lm import build_model, lm_loss, make_loader, train_lm
from deepseek.train.metrics import read_metrics
from deepseek.train.trainer import Trainer
from deepseek.train.config import TrainConfig, describe_fields, load_train_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture
def data_dir(lm_data):
    return lm_data  # tests/conftest.py: stdlib json/ + email/, byte tokens, 15 % validation


def tiny_config(run_dir, data_dir, *overrides):
    base = [f"run_dir={run_dir}", f"data.path={data_dir}", "max_steps=12", "batch_size=8", "precision=fp32",
            "log_every=2", "eval_every=6", "data.seq_len=64", "data.eval_batches=2", "progress=false",
            "tensorboard=false", "optimizer.lr=3e-3", "schedule.warmup_steps=2", "checkpoint.every=6"]
    return load_train_config(None, [*base, *overrides])


def final_weights(run_dir):
    model, _ = ds.load(run_dir / "model")
    return model.state_dict()


def test_loss_falls_and_metrics_are_written(tmp_path, data_dir):
    cfg = tiny_config(tmp_path / "run", data_dir, "max_steps=40", "eval_every=20", "log_every=5")
    result = train_lm(cfg)
    records = read_metrics(tmp_path / "run")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(5, 41, 5))
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "expert_load_max_over_mean"):
        assert key in train[0], key
    assert train[-1]["loss"] < train[0]["loss"] - 1.0  # byte-level loss starts near ln(259) = 5.56
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[-1]["val_ppl"] == pytest.approx(math.exp(evals[-1]["val_loss"]))
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert result.step == 40 and result.final_eval["val_loss"] == evals[-1]["val_loss"]
    model, tokenizer = ds.load(tmp_path / "run" / "model")
    assert model.config.vocab_size == tokenizer.get_vocab_size() == 259


class CrashAfter:
    """Wraps a loader and raises after ``n`` batches: a run that dies mid-way (after a checkpoint)."""

    def __init__(self, loader, n):
        self.loader, self.left = loader, n

    def __next__(self):
        if self.left == 0:
            raise RuntimeError("simulated crash")
        self.left -= 1
        return next(self.loader)

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


def run_trainer(cfg, crash_after=None):
    tokenizer = byte_tokenizer()
    model = build_model(cfg, tokenizer)
    loader = make_loader(cfg)
    batches = CrashAfter(loader, crash_after) if crash_after is not None else loader
    trainer = Trainer(model, cfg, batches=batches, loss_fn=lm_loss, tokenizer=tokenizer,
                      save_model=lambda m, p: ds.save(m, tokenizer, p))
    return trainer, trainer.fit()


@pytest.mark.parametrize("extra", [[], ["model.dropout=0.1", "data.curriculum=[[0, 32], [5, 64]]"]])
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, data_dir, extra):
    cfg = tiny_config(tmp_path / "a", data_dir, *extra)
    run_trainer(cfg)
    crashed = tiny_config(tmp_path / "b", data_dir, *extra)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_trainer(crashed, crash_after=8)  # dies at step 9, two steps after the checkpoint of step 6
    resumed = tiny_config(tmp_path / "b", data_dir, *extra, "checkpoint.resume=true")
    _, result = run_trainer(resumed)
    assert result.resumed_from == 6 and result.step == 12
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # The metrics of the resumed run read as one run: no duplicated steps.
    steps = [r["step"] for r in read_metrics(tmp_path / "b") if "loss" in r]
    assert steps == [r["step"] for r in read_metrics(tmp_path / "a") if "loss" in r]


def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path, data_dir):
    cfg = tiny_config(tmp_path / "r", data_dir, "max_steps=12", "checkpoint.every=4", "checkpoint.keep_last=3")
    run_trainer(cfg)
    newest = tmp_path / "r" / "checkpoints" / "step-00000012"
    (newest / "optimizer.pt").write_bytes(b"truncated")
    model = build_model(cfg, byte_tokenizer())
    trainer = Trainer(model, tiny_config(tmp_path / "r", data_dir, "max_steps=12"), batches=make_loader(cfg),
                      loss_fn=lm_loss)
    with pytest.warns(UserWarning, match="step-00000012"):
        assert trainer.resume() == 8


def test_gradient_accumulation_matches_the_full_batch(tmp_path, data_dir):
    # optimizer.eps=1e-6: the BLAS sums a 2-row and an 8-row product in different orders on some CPUs (measured on
    # a Sapphire Rapids Xeon), and Adam's g / (sqrt(v) + eps) turns those last-bit differences of near-zero
    # gradients into 3e-5 weight differences at eps=1e-8 (3.6e-7 at 1e-6), like the tensor-parallel test's.
    full = tiny_config(tmp_path / "full", data_dir, "max_steps=3", "checkpoint.every=0", "eval_every=0",
                       "optimizer.eps=1e-6")
    accum = tiny_config(tmp_path / "acc", data_dir, "max_steps=3", "checkpoint.every=0", "eval_every=0",
                        "micro_batch_size=2", "optimizer.eps=1e-6")
    a_trainer, _ = run_trainer(full)
    b_trainer, _ = run_trainer(accum)
    assert b_trainer.accum == 4
    for (name, p), q in zip(a_trainer.model.named_parameters(), b_trainer.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_autocast_trains_and_fp16_is_refused_on_cpu(tmp_path, data_dir):
    cfg = tiny_config(tmp_path / "bf16", data_dir, "precision=bf16", "max_steps=4", "checkpoint.every=0")
    result = train_lm(cfg)
    assert math.isfinite(result.loss)
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        train_lm(tiny_config(tmp_path / "fp16", data_dir, "precision=fp16", "device=cpu"))


def test_sigmoid_router_biases_move_and_aux_loss_is_logged(tmp_path, data_dir):
    cfg = tiny_config(tmp_path / "bal", data_dir, "model.router=sigmoid", "model.bias_update_speed=0.01",
                      "max_steps=4", "checkpoint.every=0", "eval_every=0", "log_every=1")
    trainer, _ = run_trainer(cfg)
    biases = [m.expert_bias for m in trainer.model.routers()]
    assert all(b.abs().sum() > 0 for b in biases)
    cfg = tiny_config(tmp_path / "aux", data_dir, "model.aux_loss_coef=0.01", "max_steps=2", "checkpoint.every=0",
                      "eval_every=0", "log_every=1")
    run_trainer(cfg)
    assert all(r["aux_loss"] > 0 for r in read_metrics(tmp_path / "aux") if "loss" in r)


def test_a_plain_module_trains_with_its_own_loss(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (x[:, :4].sum(dim=1) > 0).long()

    def batches():
        g = torch.Generator().manual_seed(0)
        while True:
            idx = torch.randint(0, 256, (32,), generator=g)
            yield x[idx], y[idx]

    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    cfg = load_train_config(None, [f"run_dir={tmp_path}", "max_steps=60", "batch_size=32", "precision=fp32",
                                   "progress=false", "tensorboard=false", "eval_every=0", "optimizer.lr=1e-2",
                                   "optimizer.weight_decay=0.0", "schedule.warmup_steps=1", "checkpoint.every=0",
                                   "checkpoint.save_final=false"])

    def accuracy(m):
        return {"val_accuracy": (m(x).argmax(-1) == y).float().mean().item()}

    trainer = Trainer(model, cfg, batches=batches(), loss_fn=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
                      eval_fn=accuracy, throughput_unit="samples/s")
    result = trainer.fit()
    assert result.final_eval["val_accuracy"] > 0.9
    assert "samples_per_s" in read_metrics(tmp_path)[0]


def test_config_errors_list_the_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match="valid keys: .*max_steps"):
        load_train_config(None, ["max_step=3"])
    with pytest.raises(ConfigError, match="n_routed_experts"):
        load_train_config(None, ["model.n_expert=3"])
    with pytest.raises(ConfigError, match="valid keys: .*warmup_steps"):
        load_train_config(None, ["schedule.warmup=3"])
    with pytest.raises(ConfigError, match="multiple of micro_batch_size"):
        load_train_config(None, ["batch_size=6", "micro_batch_size=4"])


def test_every_field_has_help_and_the_shipped_configs_load():
    rows = describe_fields()
    keys = {key for key, _, _ in rows}
    assert {"run_dir", "max_steps", "seed", "batch_size", "precision", "optimizer.lr", "schedule.warmup_steps",
            "clip.mode", "checkpoint.keep_last", "data.curriculum", "model.n_routed_experts"} <= keys
    assert all(text for _, _, text in rows)
    for name in ("tiny", "quickstart"):
        cfg = load_train_config(CONFIGS / f"{name}.yaml")
        assert isinstance(cfg, TrainConfig)
    assert load_train_config(CONFIGS / "quickstart.yaml").model_config().n_routed_experts == 8
    assert json.dumps(describe_fields())


def test_a_loss_functions_last_figures_are_logged_as_means_over_the_micro_batches(tmp_path):
    """A loss_fn with a ``last`` dict (DPO's rewards, GRPO's kl) has it logged with the step's loss."""

    class LossWithFigures:
        def __init__(self):
            self.last = {}

        def __call__(self, model, batch):
            self.last = {"first_value": float(batch[0, 0]), "loss": -1.0}  # a figure may not shadow the loss
            return model(batch).pow(2).mean()

    def batches():
        step = 0
        while True:
            step += 1
            yield torch.arange(4.0).repeat_interleave(2).view(4, 2) + 10 * step  # micro-batch b starts at 10s + b

    cfg = load_train_config(None, [f"run_dir={tmp_path}", "max_steps=2", "batch_size=4", "micro_batch_size=1",
                                   "precision=fp32", "progress=false", "tensorboard=false", "eval_every=0",
                                   "checkpoint.every=0", "checkpoint.save_final=false", "log_every=1"])
    Trainer(nn.Linear(2, 1), cfg, batches=batches(), loss_fn=LossWithFigures()).fit()
    records = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert [r["first_value"] for r in records] == [11.5, 21.5]  # mean of 10s + 0..3
    assert all(r["loss"] >= 0 for r in records)
