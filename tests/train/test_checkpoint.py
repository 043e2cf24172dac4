"""Checkpoints: round trips, pruning, corrupt and partial folders, and bit-identical resume."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

import deepseek as ds
from deepseek.train import (CheckpointError, ClipConfig, GradientClipper, OptimizerConfig, ScheduleConfig,
                            build_optimizer, build_scheduler, checkpoint_step, latest_checkpoint, list_checkpoints,
                            load_checkpoint, save_checkpoint, verify_checkpoint)

TINY = dict(d_model=32, n_heads=4, n_kv_heads=2, moe_ffn_dim=16, n_routed_experts=4, top_k=2, max_seq_len=32)


def make_run(seed: int = 0, **overrides):
    """A tiny MoE model with AdamW, a warm-up + cosine schedule and a dynamic clipper."""
    torch.manual_seed(seed)
    model = ds.MoETransformer(ds.preset("tiny", **{**TINY, **overrides}))
    opt = build_optimizer(model, OptimizerConfig(lr=1e-2))
    sched = build_scheduler(opt, ScheduleConfig(warmup_steps=2), max_steps=6)
    clipper = GradientClipper(ClipConfig(max_norm=10.0, warmup_steps=2))
    return model, opt, sched, clipper


def train(model, opt, sched, clipper, steps: int) -> None:
    """Batches come from the global RNG, so resuming only matches if the RNG is restored too."""
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 9))
        loss = model(ids[:, :-1], targets=ids[:, 1:])
        loss.backward()
        clipper(model.parameters())
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def assert_same_params(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def assert_same_optimizer_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        for key, value in sa["state"][i].items():
            assert torch.equal(value, sb["state"][i][key]), (i, key)


def test_round_trip_restores_model_optimizer_scheduler_rng_and_state(tmp_path):
    model, opt, sched, clipper = make_run()
    train(model, opt, sched, clipper, 2)
    random.seed(5)
    np.random.seed(5)
    path = save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched,
                           state={"clipper": clipper.state_dict(), "loader": {"epoch": 1, "offset": 64}},
                           tokenizer=ds.byte_tokenizer())
    assert path == tmp_path / "step-00000002" and checkpoint_step(path) == 2
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model", "optimizer.pt", "rng.pt",
                                                     "trainer.json"]
    expected = (torch.rand(4), random.random(), np.random.rand())

    loaded, tokenizer = ds.load(path / "model")  # a full model directory
    assert_same_params(model, loaded)
    assert tokenizer.get_vocab_size() == ds.byte_tokenizer().get_vocab_size()

    model2, opt2, sched2, _ = make_run(seed=1)
    params_before = [id(p) for p in model2.parameters()]
    state = load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2)
    assert torch.equal(torch.rand(4), expected[0])
    assert (random.random(), np.random.rand()) == expected[1:]
    assert state == {"clipper": clipper.state_dict(), "loader": {"epoch": 1, "offset": 64}}
    assert [id(p) for p in model2.parameters()] == params_before  # copied in place
    assert_same_params(model, model2)
    assert_same_optimizer_state(opt, opt2)
    assert sched2.state_dict() == sched.state_dict()


def test_rng_is_restored_exactly(tmp_path):
    model, opt, _, _ = make_run()
    random.seed(1)
    np.random.seed(1)
    path = save_checkpoint(tmp_path, 0, model=model, optimizer=opt)
    after_save = (torch.rand(8), random.random(), np.random.rand(3), torch.randn(2))
    torch.rand(100), random.random(), np.random.rand(7)  # move every generator on
    load_checkpoint(path, model=model)
    after_load = (torch.rand(8), random.random(), np.random.rand(3), torch.randn(2))
    assert torch.equal(after_save[0], after_load[0]) and torch.equal(after_save[3], after_load[3])
    assert after_save[1] == after_load[1] and np.array_equal(after_save[2], after_load[2])
    load_checkpoint(path, model=model, restore_rng=False)
    assert not torch.equal(torch.rand(8), after_save[0])


def test_resume_is_bit_identical(tmp_path):
    model, opt, sched, clipper = make_run(dropout=0.1)  # dropout draws from the RNG as well
    train(model, opt, sched, clipper, 6)

    model_a, opt_a, sched_a, clipper_a = make_run(dropout=0.1)
    train(model_a, opt_a, sched_a, clipper_a, 3)
    save_checkpoint(tmp_path, 3, model=model_a, optimizer=opt_a, scheduler=sched_a,
                    state={"clipper": clipper_a.state_dict()})
    del model_a, opt_a, sched_a, clipper_a

    model_b, opt_b, sched_b, clipper_b = make_run(seed=123, dropout=0.1)  # fresh objects, other init
    path = latest_checkpoint(tmp_path)
    state = load_checkpoint(path, model=model_b, optimizer=opt_b, scheduler=sched_b)
    clipper_b.load_state_dict(state["clipper"])
    train(model_b, opt_b, sched_b, clipper_b, 3)

    assert_same_params(model, model_b)
    assert_same_optimizer_state(opt, opt_b)
    assert sched.state_dict() == sched_b.state_dict()
    assert clipper.state_dict() == clipper_b.state_dict()


def test_keep_last_prunes_older_checkpoints(tmp_path):
    model, opt, _, _ = make_run()
    for step in (10, 20, 30, 40, 50):
        save_checkpoint(tmp_path, step, model=model, optimizer=opt, keep_last=2)
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [40, 50]
    # the checkpoint just written survives even when newer ones exist
    save_checkpoint(tmp_path, 45, model=model, optimizer=opt, keep_last=1)
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [45, 50]
    for step in (60, 70):
        save_checkpoint(tmp_path, step, model=model, optimizer=opt, keep_last=0)  # 0 keeps all
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [45, 50, 60, 70]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000045", "step-00000050", "step-00000060",
                                                         "step-00000070"]


def test_truncated_newest_checkpoint_falls_back_to_older(tmp_path):
    model, opt, sched, _ = make_run()
    older = save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched)
    newest = save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched)
    weights = newest / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step-00000002: .*truncated"):
        assert latest_checkpoint(tmp_path) == older
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        load_checkpoint(newest, model=model)
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt or truncated"):
        load_checkpoint(newest, model=model, verify=False)  # safetensors itself refuses it


def test_corrupt_bytes_and_missing_manifest_are_skipped(tmp_path):
    model, opt, _, _ = make_run()
    first = save_checkpoint(tmp_path, 1, model=model, optimizer=opt)
    second = save_checkpoint(tmp_path, 2, model=model, optimizer=opt)
    third = save_checkpoint(tmp_path, 3, model=model, optimizer=opt)
    data = bytearray((second / "optimizer.pt").read_bytes())
    data[-10] ^= 0xFF  # same size, different content
    (second / "optimizer.pt").write_bytes(bytes(data))
    (third / "manifest.json").unlink()  # as if the process died before the manifest
    with pytest.warns(UserWarning) as record:
        assert latest_checkpoint(tmp_path) == first
    messages = [str(w.message) for w in record]
    assert any("step-00000003" in m and "manifest.json is missing" in m for m in messages)
    assert any("step-00000002" in m and "sha256" in m for m in messages)
    with pytest.raises(CheckpointError, match="optimizer.pt is corrupt"):
        verify_checkpoint(second)


def test_leftover_temp_dirs_are_ignored_and_cleaned(tmp_path):
    model, opt, _, _ = make_run()
    save_checkpoint(tmp_path, 1, model=model, optimizer=opt)
    crashed = tmp_path / ".step-00000002.tmp-0123abcd"  # a save interrupted half-way
    crashed.mkdir()
    (crashed / "optimizer.pt").write_bytes(b"partial")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000001"
    save_checkpoint(tmp_path, 3, model=model, optimizer=opt)
    assert not crashed.exists()
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000003"
    assert latest_checkpoint(tmp_path / "nothing-here") is None


class TiedCNN(nn.Module):
    """A generic module: a small CNN with a classifier tied to an embedding, and a BatchNorm buffer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


def test_generic_module_without_tokenizer(tmp_path):
    torch.manual_seed(0)
    model = TiedCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        nn.functional.cross_entropy(model(torch.randn(4, 1, 6, 6)), torch.randint(0, 10, (4,))).backward()
        opt.step()
        opt.zero_grad()
    path = save_checkpoint(tmp_path, 2, model=model, optimizer=opt)
    assert sorted(p.name for p in (path / "model").iterdir()) == ["model.safetensors"]
    torch.manual_seed(1)
    fresh = TiedCNN()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    assert load_checkpoint(path, model=fresh, optimizer=fresh_opt) == {}
    assert_same_params(model, fresh)
    assert fresh.head.weight is fresh.embed.weight
    assert_same_optimizer_state(opt, fresh_opt)


def test_mismatched_model_and_optimizer_raise_checkpoint_error(tmp_path):
    model, opt, _, _ = make_run()
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=opt)
    other = ds.MoETransformer(ds.preset("tiny", **{**TINY, "d_model": 64}))
    with pytest.raises(CheckpointError, match="do not fit the model"):
        load_checkpoint(path, model=other)
    small = nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="do not fit the model"):
        load_checkpoint(path, model=small)
    with pytest.raises(CheckpointError, match="no scheduler state"):
        load_checkpoint(path, model=model, scheduler=build_scheduler(opt, ScheduleConfig(), 10))
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_checkpoint(tmp_path / "step-00000009", model=model)


def test_state_must_be_json_serializable(tmp_path):
    model, opt, _, _ = make_run()
    with pytest.raises(TypeError, match="JSON-serializable"):
        save_checkpoint(tmp_path, 1, model=model, optimizer=opt, state={"t": torch.zeros(1)})
    assert list_checkpoints(tmp_path) == []


def test_trainer_json_is_plain_json(tmp_path):
    model, opt, sched, _ = make_run()
    path = save_checkpoint(tmp_path, 7, model=model, optimizer=opt, scheduler=sched, state={"a": [1, 2.5]})
    trainer = json.loads((path / "trainer.json").read_text())
    assert trainer["step"] == 7 and trainer["state"] == {"a": [1, 2.5]}
    assert trainer["scheduler"]["last_epoch"] == sched.last_epoch
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) >= {"optimizer.pt", "trainer.json", "rng.pt", "model/model.safetensors"}
