"""Optimizer groups (what gets weight decay) and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import deepseek as ds
from deepseek.config import ConfigError, from_dict
from deepseek.nn import RMSNorm
from deepseek.train import (OptimizerConfig, ScheduleConfig, build_optimizer, build_scheduler, lr_multiplier,
                            param_groups)


def groups_by_name(groups: list[dict]) -> dict[str, list[nn.Parameter]]:
    return {g["name"]: g["params"] for g in groups}


def assert_partition(model: nn.Module, groups: list[dict]):
    """Every trainable parameter is in exactly one group."""
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen))
    assert set(seen) == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("tie", [False, True])
def test_no_decay_membership_on_moe_transformer(tie):
    model = ds.MoETransformer(ds.preset("tiny", tie_embeddings=tie, attention_bias=True))
    groups = param_groups(model, weight_decay=0.1)
    assert_partition(model, groups)
    named = {id(p): n for n, p in model.named_parameters()}
    no_decay = {named[id(p)] for p in groups_by_name(groups)["no_decay"]}
    decay = {named[id(p)] for p in groups_by_name(groups)["decay"]}
    assert "embed.weight" in no_decay
    assert all(named[id(m.weight)] in no_decay for m in model.modules() if isinstance(m, RMSNorm))
    assert any(n.endswith(".bias") for n in no_decay)  # attention_bias=True: q/k/v biases
    params = dict(model.named_parameters())
    assert decay == {n for n, p in params.items() if p.ndim >= 2 and n != "embed.weight"}
    assert ("lm_head.weight" in decay) == (not tie)
    assert {"blocks.0.ffn.experts.gate_up", "blocks.0.ffn.router.weight", "blocks.1.attn.q.weight"} <= decay
    wd = {g["name"]: g["weight_decay"] for g in groups}
    assert wd == {"decay": 0.1, "no_decay": 0.0}


def test_decay_embeddings_moves_embedding_to_decay():
    model = ds.MoETransformer(ds.preset("tiny"))
    groups = groups_by_name(param_groups(model, 0.1, decay_embeddings=True))
    assert any(p is model.embed.weight for p in groups["decay"])


class TiedNet(nn.Module):
    """A generic module whose head shares the embedding's Parameter, with a frozen layer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.proj = nn.Linear(8, 8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight


def test_tied_generic_module_dedupes_and_skips_frozen():
    model = TiedNet()
    groups = param_groups(model, 0.05)
    assert_partition(model, groups)
    g = groups_by_name(groups)
    assert [p.shape for p in g["decay"]] == [torch.Size([8, 8])]  # proj.weight only
    assert any(p is model.embed.weight for p in g["no_decay"]) and len(g["no_decay"]) == 2  # + proj.bias


def test_empty_group_is_left_out():
    groups = param_groups(nn.Linear(4, 4, bias=False), 0.1)
    assert [g["name"] for g in groups] == ["decay"]


def test_adamw_decays_only_the_decay_group():
    torch.manual_seed(0)
    model = ds.MoETransformer(ds.preset("tiny"))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.weight.fill_(1.5)  # a norm weight away from 0 would visibly shrink if decayed
    opt = build_optimizer(model, OptimizerConfig(lr=0.1, weight_decay=0.5))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True  # CPU, plain parameters
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    g = groups_by_name(opt.param_groups)
    named = dict(model.named_parameters())
    ids_decay = {id(p) for p in g["decay"]}
    for name, p in named.items():
        if id(p) in ids_decay:
            # AdamW: p *= 1 - lr * wd; the Adam update is 0 for zero gradients
            torch.testing.assert_close(p, before[name] * (1 - 0.1 * 0.5))
        else:
            assert torch.equal(p, before[name]), name


def test_fused_choice():
    model = nn.Linear(3, 3)
    assert build_optimizer(model, OptimizerConfig(), device_type="cuda").defaults["fused"] is True
    assert build_optimizer(model, OptimizerConfig()).defaults["fused"] is True  # CPU: one pass instead of one per op
    assert build_optimizer(model, OptimizerConfig(fused=False)).defaults["foreach"] is True
    assert build_optimizer(model, OptimizerConfig(), device_type="mps").defaults["foreach"] is True
    opt = build_optimizer(model, OptimizerConfig(fused=True, betas=(0.8, 0.9)))
    assert opt.defaults["fused"] is True and opt.defaults["betas"] == (0.8, 0.9)


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_schedule_key_steps(decay):
    kw = dict(warmup_steps=10, max_steps=110, decay=decay, min_lr_ratio=0.1)
    assert lr_multiplier(0, **kw) == pytest.approx(0.1)
    assert lr_multiplier(4, **kw) == pytest.approx(0.5)
    assert lr_multiplier(9, **kw) == pytest.approx(1.0)
    assert lr_multiplier(10, **kw) == pytest.approx(1.0)
    end = 1.0 if decay == "constant" else 0.1
    mid = {"cosine": 0.55, "linear": 0.55, "constant": 1.0}[decay]
    assert lr_multiplier(60, **kw) == pytest.approx(mid)
    assert lr_multiplier(110, **kw) == pytest.approx(end)
    assert lr_multiplier(500, **kw) == pytest.approx(end)  # clamped after max_steps
    if decay == "cosine":
        assert lr_multiplier(35, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_schedule_without_warmup_and_monotone_decay():
    values = [lr_multiplier(s, warmup_steps=0, max_steps=50, decay="cosine", min_lr_ratio=0.0) for s in range(51)]
    assert values[0] == 1.0 and values[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_build_scheduler_drives_the_optimizer_lr():
    model = nn.Linear(2, 2)
    opt = build_optimizer(model, OptimizerConfig(lr=1.0, weight_decay=0.0))
    sched = build_scheduler(opt, ScheduleConfig(warmup_steps=4, decay="linear", min_lr_ratio=0.0), max_steps=8)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0])
    assert all(g["lr"] == opt.param_groups[0]["lr"] for g in opt.param_groups)


def test_configs_validate_and_coerce():
    cfg = from_dict(OptimizerConfig, {"betas": [0.8, 0.99], "lr": "1e-3"})
    assert cfg.betas == (0.8, 0.99) and cfg.lr == 1e-3
    with pytest.raises(ConfigError, match="betas"):
        OptimizerConfig(betas=(0.9, 1.5))
    with pytest.raises(ConfigError, match="decay"):
        from_dict(ScheduleConfig, {"decay": "exponential"})
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        ScheduleConfig(min_lr_ratio=2.0)


def test_fused_cpu_step_equals_foreach_step():
    # The CPU default changed from foreach to the fused kernel: the same AdamW update, to rounding.
    torch.manual_seed(0)
    models = [ds.MoETransformer(ds.preset("tiny")) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    ids = torch.randint(0, models[0].config.vocab_size, (2, 16))
    opts = [build_optimizer(models[0], OptimizerConfig(lr=1e-2)), build_optimizer(models[1], OptimizerConfig(lr=1e-2,
                                                                                                        fused=False))]
    assert opts[0].defaults["fused"] is True and opts[1].defaults["foreach"] is True
    for _ in range(3):
        for model, opt in zip(models, opts):
            model(ids[:, :-1], targets=ids[:, 1:]).backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
