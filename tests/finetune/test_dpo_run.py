"""`ds finetune run` with method: dpo: preference encoding, LoRA and full DPO through the Trainer."""

import json
from pathlib import Path

import pytest
import torch

import deepseek as ds
from deepseek.data.tokenizer import train_tokenizer
from deepseek.finetune.config import load_finetune_config
from deepseek.finetune.preference import read_preference_jsonl
from deepseek.finetune.run import DPOLoss, evaluate_dpo, finetune, preference_rows
from deepseek.finetune.sft import encode_chat
from deepseek.models.config import preset
from deepseek.models.transformer import MoETransformer

ROOT = Path(__file__).resolve().parents[2]
SYSTEM = {"role": "system", "content": "You write Python."}
PAIRS = [{"prompt": [SYSTEM, {"role": "user", "content": f"add {i} and {i + 1}"}],
          "chosen": [{"role": "assistant", "content": f"{2 * i + 1}"}],
          "rejected": [{"role": "assistant", "content": "def f(x): return x"}]} for i in range(5)]
PAIRS.append({"prompt": "def f(x):", "chosen": "return x", "rejected": "add 1 and 2"})  # plain strings


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dpo")
    tokenizer = train_tokenizer(["add 1 and 2 gives 3\ndef f(x): return x\nYou write Python.\n" * 20],
                                vocab_size=300)
    torch.manual_seed(0)
    config = preset("tiny", vocab_size=300, router="softmax", n_shared_experts=0, first_k_dense=0,
                    routed_scaling_factor=1.0, norm_topk_prob=True, attention_bias=False, qk_norm=False)
    ds.save(MoETransformer(config), tokenizer, folder / "base")
    data = folder / "pref.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return folder / "base", data, tokenizer


def overrides(base, data, run_dir, *extra):
    return [f"init={base}", "method=dpo", f"data.train={data}", f"run_dir={run_dir}", "max_steps=6", "seq_len=64",
            "batch_size=2", "precision=fp32", "device=cpu", "progress=false", "tensorboard=false", "log_every=1",
            "eval_every=0", "schedule.warmup_steps=0", "optimizer.lr=1e-2", "dpo.beta=0.5", "seed=0", *extra]


def test_encoding_masks_exactly_the_assistant_turn(setup):
    _, data, tokenizer = setup
    pairs = read_preference_jsonl(data, tokenizer, max_len=64)
    assert len(pairs) == len(PAIRS)
    for pair, row in zip(pairs, PAIRS):
        prompt = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
        for side, ids, mask in (("chosen", pair.chosen_ids, pair.chosen_mask),
                                ("rejected", pair.rejected_ids, pair.rejected_mask)):
            answer = row[side] if isinstance(row[side], list) else [{"role": "assistant", "content": row[side]}]
            want_ids, labels = encode_chat(tokenizer, prompt + answer)
            assert ids == want_ids
            assert mask == [int(label != -100) for label in labels]
            assert 0 < sum(mask) < len(mask) and mask[-sum(mask):] == [1] * sum(mask)  # the final turn only
            content = answer[0]["content"]
            assert content in tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False)


def test_bad_row_is_reported_by_path_and_line(setup, tmp_path):
    _, _, tokenizer = setup
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps({"prompt": "x", "chosen": "y"}) + "\nnot json\n")
    problems = []
    pairs = read_preference_jsonl(path, tokenizer, max_len=64, problems=problems)
    assert len(pairs) == 1
    assert problems[0].startswith(f"{path}:2: ") and "rejected" in problems[0]
    assert problems[1].startswith(f"{path}:3: not JSON")
    with pytest.raises(ValueError, match=f"{path}:2"):
        read_preference_jsonl(path, tokenizer, max_len=64, on_bad="error")


def test_all_padding_columns_are_trimmed_without_changing_the_loss(setup):
    # A loader's batch is padded to the file's longest pair; DPOLoss drops the columns no row of the batch uses.
    from deepseek.finetune.preference import PreferenceBatch, collate_pairs, trim_padding
    from deepseek.nn.lora import LoRAConfig, apply_lora
    base_dir, data, tokenizer = setup
    pairs = read_preference_jsonl(data, tokenizer, max_len=64)[:2]
    tight = collate_pairs(pairs)
    padded = PreferenceBatch(*(torch.cat([t, torch.zeros(t.shape[0], 9, dtype=t.dtype)], dim=1)
                               for t in (tight.chosen_ids, tight.chosen_mask, tight.rejected_ids, tight.rejected_mask)))
    trimmed = trim_padding(padded)
    assert trimmed.chosen_ids.shape == tight.chosen_ids.shape
    assert torch.equal(trimmed.rejected_mask, tight.rejected_mask)
    assert trim_padding(tight) is tight
    model, _ = ds.load(base_dir)
    apply_lora(model, LoRAConfig(r=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # a policy away from its reference: a loss that depends on every log-prob
        loss_padded, metrics_padded = DPOLoss(0.5).terms(model, padded)
        loss_tight, metrics_tight = DPOLoss(0.5).terms(model, tight)
    torch.testing.assert_close(loss_padded, loss_tight)
    torch.testing.assert_close(metrics_padded["rewards/margin"], metrics_tight["rewards/margin"])


def _metrics(model, data, tokenizer, reference=None):
    rows = preference_rows(str(data), tokenizer, 64, on_bad="error")
    return evaluate_dpo(model, rows, 8, DPOLoss(0.5, reference=reference))


def test_lora_dpo_writes_an_adapter_and_learns_the_preferences(setup, tmp_path):
    from deepseek.models.adapters import load_adapter
    base_dir, data, tokenizer = setup
    config = load_finetune_config(ROOT / "configs" / "finetune-lora.yaml",
                                  overrides(base_dir, data, tmp_path / "run", "lora.r=4", "data.eval=null"))
    result = finetune(config)
    assert result.step == 6 and torch.isfinite(torch.tensor(result.loss))
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and not (tmp_path / "run" / "model").exists()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 6  # the loss's reward figures are logged with each step's loss
    assert all({"rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin"} <= set(r) for r in steps)
    model, _ = ds.load(base_dir)
    reference, _ = ds.load(base_dir)
    before = _metrics(model, data, tokenizer, reference.requires_grad_(False))  # adapters start at zero
    assert before["val_loss"] == pytest.approx(0.6931, abs=1e-3) and before["val_rewards/margin"] == 0
    load_adapter(model, adapter)  # the reference is now the model with its adapters disabled
    after = _metrics(model, data, tokenizer)
    assert after["val_loss"] < before["val_loss"]
    assert after["val_rewards/margin"] > 0 and after["val_rewards/accuracy"] > before["val_rewards/accuracy"]


def test_full_dpo_runs_against_a_frozen_reference(setup, tmp_path):
    base_dir, data, tokenizer = setup
    config = load_finetune_config(None, overrides(base_dir, data, tmp_path / "run", f"data.eval={data}"))
    result = finetune(config)
    assert result.step == 6 and result.final_eval["val_loss"] < 0.6931
    assert result.final_eval["val_rewards/margin"] > 0
    model, _ = ds.load(tmp_path / "run" / "model")
    reference, _ = ds.load(base_dir)
    after = _metrics(model, data, tokenizer, reference=reference.requires_grad_(False))
    assert after["val_loss"] == pytest.approx(result.final_eval["val_loss"], abs=1e-4)
    assert after["val_rewards/accuracy"] > 0.5


def test_dpo_resume_reaches_the_uninterrupted_runs_adapter(setup, tmp_path):
    import shutil
    from safetensors.torch import load_file
    base_dir, data, _ = setup
    common = overrides(base_dir, data, "x", "lora={r: 4}", "checkpoint.every=3", "checkpoint.keep_last=0")
    finetune(load_finetune_config(None, [*common, f"run_dir={tmp_path / 'a'}"]))
    finetune(load_finetune_config(None, [*common, f"run_dir={tmp_path / 'b'}"]))
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-00000006")
    shutil.rmtree(tmp_path / "b" / "adapter")
    result = finetune(load_finetune_config(None, [*common, f"run_dir={tmp_path / 'b'}", "checkpoint.resume=true"]))
    assert result.resumed_from == 3 and result.step == 6
    a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_dpo_config_errors(setup, tmp_path):
    from deepseek.config import ConfigError
    base_dir, data, _ = setup
    with pytest.raises(ConfigError, match="dpo.beta"):
        load_finetune_config(None, overrides(base_dir, data, tmp_path / "run", "dpo.beta=0"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")  # an SFT row
    with pytest.raises(ConfigError, match="no usable preference pair"):
        finetune(load_finetune_config(None, overrides(base_dir, empty, tmp_path / "run")))
