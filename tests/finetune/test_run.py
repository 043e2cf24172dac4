"""`ds finetune run` and `ds lora merge`: LoRA and full SFT of a model directory through the Trainer, exact resume."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import deepseek as ds
from deepseek.config import ConfigError
from deepseek.data.tokenizer import train_tokenizer
from deepseek.finetune.config import load_finetune_config
from deepseek.finetune.run import finetune
from deepseek.models.adapters import load_adapter
from deepseek.models.config import preset
from deepseek.models.transformer import MoETransformer
from tests.test_cli_train import run_ds  # noqa: F401  (re-exported to the other fine-tuning tests)

ROOT = Path(__file__).resolve().parents[2]
CHATS = [[{"role": "user", "content": f"add {i} and {i + 1}"}, {"role": "assistant", "content": f"{2 * i + 1}"}]
         for i in range(6)] + [[{"role": "user", "content": "def f(x):"}, {"role": "assistant", "content": "return x"}]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Mixtral-shaped model directory (exportable, so adapters save in PEFT's format) and an SFT file."""
    folder = tmp_path_factory.mktemp("ft")
    tokenizer = train_tokenizer(["add 1 and 2 gives 3\ndef f(x): return x\n" * 20], vocab_size=300)
    torch.manual_seed(0)
    config = preset("tiny", vocab_size=300, router="softmax", n_shared_experts=0, first_k_dense=0,
                    routed_scaling_factor=1.0, norm_topk_prob=True, attention_bias=False, qk_norm=False)
    ds.save(MoETransformer(config), tokenizer, folder / "base")
    data = folder / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in CHATS))
    return folder / "base", data


def overrides(base, data, run_dir, *extra):
    return [f"init={base}", f"data.train={data}", f"data.eval={data}", f"run_dir={run_dir}", "max_steps=4",
            "seq_len=64", "batch_size=2", "precision=fp32", "device=cpu", "progress=false", "tensorboard=false",
            "log_every=1", "eval_every=0", "schedule.warmup_steps=0", "optimizer.lr=1e-2", *extra]


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids)


def test_lora_run_writes_an_adapter_that_changes_only_adapter_weights(setup, tmp_path):
    base_dir, data = setup
    config = load_finetune_config(ROOT / "configs" / "finetune-lora.yaml",
                                  overrides(base_dir, data, tmp_path / "run", "lora.r=4"))
    result = finetune(config)
    assert result.step == 4 and torch.isfinite(torch.tensor(result.loss))
    adapter = tmp_path / "run" / "adapter"
    peft = json.loads((adapter / "adapter_config.json").read_text())
    assert peft["base_model_name_or_path"] == str(base_dir) and peft["r"] == 4
    assert not (tmp_path / "run" / "model").exists()
    from safetensors.torch import load_file
    saved = load_file(adapter / "adapter_model.safetensors")
    assert saved and all("lora_" in name for name in saved)  # no base weights in the adapter directory
    base, _ = ds.load(base_dir)
    adapted, _ = ds.load(base_dir)
    before = {k: v.clone() for k, v in adapted.state_dict().items()}
    load_adapter(adapted, adapter)
    for name, tensor in adapted.state_dict().items():  # the base weights under the adapters are the init's
        if "lora_" not in name:
            assert torch.equal(tensor, before[name.replace("base_layer.", "")]), name
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(logits(base, ids), logits(adapted, ids))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4] and any("val_loss" in r for r in records)


def test_full_run_writes_a_model_directory_that_differs_from_the_init(setup, tmp_path):
    base_dir, data = setup
    config = load_finetune_config(None, overrides(base_dir, data, tmp_path / "run"))
    assert config.lora is None
    finetune(config)
    tuned, tokenizer = ds.load(tmp_path / "run" / "model")
    base, base_tokenizer = ds.load(base_dir)
    assert tokenizer.to_str() == base_tokenizer.to_str()
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(logits(base, ids), logits(tuned, ids))
    assert not (tmp_path / "run" / "adapter").exists()


def test_loss_decreases_on_a_repeated_tiny_dataset(setup, tmp_path):
    base_dir, data = setup
    config = load_finetune_config(None, overrides(base_dir, data, tmp_path / "run", "max_steps=12", "seed=0",
                                                  "batch_size=1"))
    finetune(config)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_resume_reaches_the_uninterrupted_runs_adapter(setup, tmp_path):
    """A run stopped after its step-4 checkpoint (the later one removed) resumes to the same final adapter."""
    base_dir, data = setup
    common = [*overrides(base_dir, data, "x", "max_steps=8", "lora={r: 4}", "checkpoint.every=4",
                         "checkpoint.keep_last=0")]
    finetune(load_finetune_config(None, [*common, f"run_dir={tmp_path / 'a'}"]))
    finetune(load_finetune_config(None, [*common, f"run_dir={tmp_path / 'b'}"]))
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-00000008")
    shutil.rmtree(tmp_path / "b" / "adapter")
    result = finetune(load_finetune_config(None, [*common, f"run_dir={tmp_path / 'b'}", "checkpoint.resume=true"]))
    assert result.resumed_from == 4 and result.step == 8
    from safetensors.torch import load_file
    a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_cli_run_and_lora_merge_match_the_adapted_model(setup, tmp_path, ds_main):
    base_dir, data = setup
    run = tmp_path / "run"
    out = run_ds("finetune", "run", "configs/finetune-lora.yaml", *overrides(base_dir, data, run, "max_steps=2"))
    assert "fine-tuned 2 steps" in out.stdout and "parameters train" in out.stdout
    merge = ds_main("lora", "merge", base_dir, run / "adapter", tmp_path / "merged")
    assert merge.returncode == 0, merge.stderr
    merged, _ = ds.load(tmp_path / "merged")
    adapted, _ = ds.load(base_dir)
    load_adapter(adapted, run / "adapter")
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    assert (logits(merged, ids) - logits(adapted, ids)).abs().max() <= 1e-4
    assert not any("lora" in name for name in merged.state_dict())


def test_bad_key_and_missing_init_are_one_line_errors(setup, tmp_path, ds_main):
    base_dir, data = setup
    with pytest.raises(ConfigError, match="valid keys"):
        load_finetune_config(None, ["max_step=3"])
    bad = ds_main("finetune", "run", "configs/finetune-lora.yaml", "max_step=3")
    assert bad.returncode == 2 and "valid keys" in bad.stderr and "init" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = ds_main("finetune", "run", "configs/finetune-lora.yaml", f"init={tmp_path / 'none'}",
                      f"data.train={data}")
    assert missing.returncode == 2 and "not a model directory" in missing.stderr
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


def test_an_empty_eval_file_warns_and_an_unusable_train_file_is_an_error(setup, tmp_path):
    base_dir, data = setup
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.warns(UserWarning, match="no usable SFT row; no evaluation"):
        result = finetune(load_finetune_config(None, [*overrides(base_dir, data, tmp_path / "run", "max_steps=1"),
                                                      f"data.eval={empty}"]))
    assert result.step == 1 and result.final_eval is None
    with pytest.raises(ConfigError, match="data.train: .* has no usable SFT row"):
        finetune(load_finetune_config(None, [*overrides(base_dir, empty, tmp_path / "run2"), f"data.eval={data}"]))


def test_a_compressed_base_takes_qlora_and_refuses_a_full_fine_tune(setup, tmp_path):
    """A `ds compress` output (int8, fused qkv): LoRA on attn.o + experts trains; full or attn.qkv are refused early."""
    from deepseek.compress.pipeline import compress

    base_dir, data = setup
    compress(base_dir, tmp_path / "q8", "int8-weight")
    common = overrides(tmp_path / "q8", data, tmp_path / "run", "max_steps=2", "data.eval=null")
    with pytest.raises(ConfigError, match="is quantized"):
        finetune(load_finetune_config(None, common))
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any training
    result = finetune(load_finetune_config(None, [*common, "lora={r: 4, target_modules: [attn.o, ffn.experts]}"]))
    assert result.step == 2 and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    # The fused attn.qkv has no Hugging Face name: its adapter is saved in our format, and loads onto the q8 base.
    finetune(load_finetune_config(None, [*common, "lora={r: 4, target_modules: [attn.qkv]}",
                                         f"run_dir={tmp_path / 'qkv'}"]))
    adapter = tmp_path / "qkv" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["deepseek_format"] == 1
    q8, _ = ds.load(tmp_path / "q8")
    assert load_adapter(q8, adapter) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]


def test_pack_false_gives_one_example_per_row_and_the_loader_cycles_in_a_seeded_order(setup):
    from deepseek.finetune.run import SFTLoader, sft_rows

    base_dir, data = setup
    _, tokenizer = ds.load(base_dir)
    packed = sft_rows(str(data), tokenizer, 64, pack_rows=True, on_bad="error")
    single = sft_rows(str(data), tokenizer, 64, pack_rows=False, on_bad="error")
    assert single.inputs.shape[0] == len(CHATS) > packed.inputs.shape[0]
    assert (single.document_ids <= 0).all()
    loader = SFTLoader(single, batch_size=3, seed=5)
    seen = torch.cat([next(loader).inputs for _ in range(7)])  # 21 rows: three epochs of 7
    for epoch in range(3):
        rows = seen[7 * epoch:7 * (epoch + 1)]
        assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, single.inputs.tolist()))
    loader.load_state_dict({"epoch": 0, "cursor": 0})
    assert torch.equal(next(loader).inputs, seen[:3])
