"""`ds finetune run` with method: reward: a Bradley–Terry reward model on preference pairs, saved and loaded back."""

import pytest
import torch

from deepseek.finetune.config import load_finetune_config
from deepseek.finetune.preference import collate_pairs, read_preference_jsonl
from deepseek.finetune.reward import attention_mask_of, evaluate_reward, load_reward_model
from deepseek.finetune.run import finetune, result_path

from tests.finetune.tiny_base import common_overrides, make_base, preference_pairs, read_records, write_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reward")
    base, tokenizer = make_base(folder)
    train = write_jsonl(folder / "train.jsonl", preference_pairs(range(8)))
    heldout = write_jsonl(folder / "heldout.jsonl", preference_pairs(range(20, 24)))
    return base, tokenizer, train, heldout


def overrides(setup, run_dir, *extra):
    base, _, train, heldout = setup
    return common_overrides(base, run_dir, "method=reward", f"data.train={train}", f"data.eval={heldout}",
                            "max_steps=8", "batch_size=4", "optimizer.lr=1e-2", *extra)


def test_the_attention_mask_ends_at_the_last_completion_token():
    mask = attention_mask_of(torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 1]]))
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_a_reward_run_learns_the_preference_and_its_directory_loads_back(setup, tmp_path, lora):
    _, tokenizer, _, heldout = setup
    config = load_finetune_config(None, overrides(setup, tmp_path / "run", *(["lora={r: 4}"] if lora else [])))
    result = finetune(config)
    steps = [r for r in read_records(tmp_path / "run") if "loss" in r]
    assert len(steps) == 8 and all("rewards/accuracy" in r and "rewards/margin" in r for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert result.final_eval["val_accuracy"] == 1.0  # held-out pairs: every chosen side scores higher
    reward_dir = result_path(config)
    assert reward_dir == tmp_path / "run" / "reward"
    assert (reward_dir / ("adapter" if lora else "model")).is_dir()
    assert (reward_dir / "reward_head.safetensors").is_file()
    model, _ = load_reward_model(reward_dir)
    rows = collate_pairs(read_preference_jsonl(heldout, tokenizer, max_len=64))
    again = evaluate_reward(model, rows, 4)
    assert again["val_loss"] == pytest.approx(result.final_eval["val_loss"], abs=1e-5)


def test_loading_a_directory_that_is_no_reward_model_is_a_one_line_error(setup):
    from deepseek.config import ConfigError
    with pytest.raises(ConfigError, match="not a reward model directory"):
        load_reward_model(setup[0])


def test_a_resumed_reward_run_ends_with_the_uninterrupted_runs_head_and_adapter(setup, tmp_path):
    import shutil

    from safetensors.torch import load_file
    common = overrides(setup, "x", "lora={r: 4}", "max_steps=4", "checkpoint.every=2", "checkpoint.keep_last=0")
    finetune(load_finetune_config(None, [*common, f"run_dir={tmp_path / 'a'}"]))
    finetune(load_finetune_config(None, [*common, f"run_dir={tmp_path / 'b'}"]))
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-00000004")
    shutil.rmtree(tmp_path / "b" / "reward")
    result = finetune(load_finetune_config(None, [*common, f"run_dir={tmp_path / 'b'}", "checkpoint.resume=true"]))
    assert result.resumed_from == 2 and result.step == 4
    for file in ("reward_head.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(tmp_path / "a" / "reward" / file), load_file(tmp_path / "b" / "reward" / file)
        assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a), file
