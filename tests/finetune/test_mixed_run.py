"""`ds finetune run` with method: mixed: one batch per weighted term each step, the weighted sum's gradient, each
term logged."""

import pytest
import torch

from deepseek.config import ConfigError
from deepseek.finetune.config import load_finetune_config
from deepseek.finetune.mixed import MixedLoss
from deepseek.finetune.objectives import MixedObjective
from deepseek.finetune.run import build_objective, finetune, prepare_model

from tests.finetune.tiny_base import SYSTEM, common_overrides, make_base, preference_pairs, read_records, write_jsonl

CHATS = [{"messages": [SYSTEM, {"role": "user", "content": f"add {i} and {i + 1}"},
                       {"role": "assistant", "content": f"{2 * i + 1}"}]} for i in range(6)]
PROMPTS = [{"prompt": "def f(x):"}, {"prompt": "add 1 and 2"}, {"prompt": "You write"}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed")
    base, tokenizer = make_base(folder)
    files = {"sft": write_jsonl(folder / "sft.jsonl", CHATS), "rl": write_jsonl(folder / "prompts.jsonl", PROMPTS),
             "dpo": write_jsonl(folder / "pref.jsonl", preference_pairs(range(6)))}
    return base, tokenizer, files


def overrides(setup, run_dir, *extra):
    base, _, files = setup
    return common_overrides(base, run_dir, "method=mixed", "objective={sft: 0.7, rl: 0.2, dpo: 0.1}",
                            *(f"mixed.{term}.train={path}" for term, path in files.items()),
                            "lora={r: 4, dropout: 0.0}", "max_steps=2", "batch_size=2", "optimizer.lr=1e-2",
                            "grpo.group_size=2", "grpo.max_new_tokens=4", "grpo.rewards={parses: 1.0, length: 0.5}",
                            *extra)


def test_the_mixed_gradient_is_the_weighted_sum_of_the_terms_gradients(setup, tmp_path):
    _, tokenizer, _ = setup
    config = load_finetune_config(None, overrides(setup, tmp_path / "run"))
    model, _ = prepare_model(config)
    with torch.no_grad():  # adapters off zero: every term has a gradient on both A and B
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    objectives = {term: build_objective(config, term, section, tokenizer, None, where)
                  for term, (where, section) in zip(config.mixed_terms(), config.data_sections().items())}
    batch = {term: next(o.batches) for term, o in objectives.items()}
    trainable = [p for p in model.parameters() if p.requires_grad]

    def gradients(loss):
        return torch.autograd.grad(loss, trainable)

    weights = {"sft": 0.7, "rl": 0.2, "dpo": 0.1}
    mixed = MixedLoss(MixedObjective(weights), {term: o.loss_fn for term, o in objectives.items()})
    got = gradients(mixed(model, batch))
    want = [torch.zeros_like(p) for p in trainable]
    for term, o in objectives.items():
        for total, g in zip(want, gradients(o.loss_fn(model, batch[term]))):
            total += weights[term] * g
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in got)
    logged = mixed.last
    assert logged["loss/total"] == pytest.approx(sum(weights[t] * logged[f"loss/{t}"] for t in weights), rel=1e-5)
    assert {"rl/rewards/parses", "rl/kl", "dpo/rewards/accuracy"} <= set(logged)


def test_a_mixed_run_logs_every_term_and_the_total(setup, tmp_path):
    result = finetune(load_finetune_config(None, overrides(setup, tmp_path / "run")))
    assert result.step == 2
    steps = [r for r in read_records(tmp_path / "run") if "loss" in r]
    assert len(steps) == 2
    for record in steps:
        assert {"loss/sft", "loss/rl", "loss/dpo", "loss/total", "rl/rewards/parses", "rl/kl",
                "dpo/rewards/accuracy"} <= set(record)
        assert record["loss"] == pytest.approx(record["loss/total"], rel=1e-5)
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_a_zero_weight_term_needs_no_data_and_is_not_drawn(setup, tmp_path):
    base, _, files = setup
    config = load_finetune_config(None, common_overrides(
        base, tmp_path / "run", "method=mixed", "objective={sft: 1.0, dpo: 0.0}", f"mixed.sft.train={files['sft']}",
        "max_steps=1", "batch_size=2", "lora={r: 4}"))
    assert config.mixed_terms() == {"sft": 1.0}
    finetune(config)
    record = [r for r in read_records(tmp_path / "run") if "loss" in r][0]
    assert "loss/sft" in record and "loss/dpo" not in record


@pytest.mark.parametrize("extra, message", [
    (["objective={}"], "objective: objective weights must be a non-empty mapping"),
    (["objective={sft: 1.0, ppo: 1.0}"], "objective: unknown objective.*ppo.*known: sft, rl, dpo"),
    (["objective={sft: -1.0}"], "must be a non-negative finite number"),
    (["mixed.sft.trian=x"], "valid keys"),
])
def test_bad_mixed_configs_are_one_line_errors(setup, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_finetune_config(None, overrides(setup, tmp_path / "run", *extra))
    assert "\n" not in str(caught.value)


def test_a_weighted_term_without_data_and_micro_batches_are_refused(setup, tmp_path):
    with pytest.raises(ConfigError, match="mixed.dpo.train: set the JSONL file"):
        finetune(load_finetune_config(None, overrides(setup, tmp_path / "run", "mixed.dpo.train=null")))
    with pytest.raises(ConfigError, match="micro_batch_size: method: mixed"):
        finetune(load_finetune_config(None, overrides(setup, tmp_path / "run", "micro_batch_size=1")))


def test_the_shipped_mixed_config_loads_with_the_seeds_weights():
    from pathlib import Path
    config = load_finetune_config(Path(__file__).resolve().parents[2] / "configs" / "finetune-mixed.yaml")
    assert config.method == "mixed" and config.mixed_terms() == {"sft": 0.7, "rl": 0.2, "dpo": 0.1}
    assert set(config.data_sections()) == {"mixed.sft", "mixed.rl", "mixed.dpo"}
