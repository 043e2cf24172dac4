"""`ds finetune run --nproc 2`: a LoRA fine-tune on two CPU processes (DDP over gloo, torchrun) gives the adapter
the one-process run gives, each rank training on its half of every batch and rank 0 alone writing the result."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from deepseek.cli.main import app
from deepseek.config import ConfigError
from deepseek.finetune.config import load_finetune_config
from deepseek.finetune.run import SFTBatch, SFTLoader, finetune
from tests.finetune.test_run import overrides, run_ds, setup  # noqa: F401  (setup is a fixture)


def losses(run_dir) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]  # each step once: only rank 0 logged
    return [r["loss"] for r in train]


def test_ranks_take_their_share_of_the_same_global_batch():
    rows = SFTBatch(*(torch.arange(10)[:, None] + k for k in range(4)))
    single = SFTLoader(rows, 4, seed=3)
    ranks = [SFTLoader(rows, 4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(5):  # past an epoch's end: the leftover rows start the next batch on every rank alike
        whole = next(single).inputs
        assert torch.equal(torch.cat([next(loader).inputs for loader in ranks]), whole)
    assert ranks[1].state_dict() == single.state_dict()
    with pytest.raises(Exception, match="multiple of the 3 data-parallel"):
        SFTLoader(rows, 4, rank=0, world_size=3)


def test_two_processes_give_the_one_process_adapter(setup, tmp_path):  # noqa: F811
    base_dir, data = setup
    # Per step: 4 rows, one per forward. The loss of a micro-batch is its mean over assistant tokens and a step
    # averages micro-batches (and DDP averages ranks), so 1 process x 4 micro-batches of 1 row and 2 processes x
    # 2 micro-batches of 1 row (micro_batch_size counts the global rows of a micro-step) minimise the same loss.
    common = ["lora={r: 4, alpha: 8, dropout: 0.0}", "max_steps=4", "batch_size=4", "checkpoint.every=0"]
    torch.set_num_threads(1)  # as each torchrun worker has
    finetune(load_finetune_config(None, overrides(base_dir, data, tmp_path / "one", *common, "micro_batch_size=1")))
    config = tmp_path / "lora.yaml"
    config.write_text("seed: 0\n")
    result = run_ds("finetune", "run", config, "--nproc", "2",
                    *overrides(base_dir, data, tmp_path / "two", *common, "micro_batch_size=2"))
    assert result.stdout.count("fine-tuned 4 steps") == 1  # rank 0 reports, rank 1 stays quiet

    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys() and one
    # Same arithmetic up to the order of float32 sums (gloo's all-reduce, per-rank accumulation): ~1e-7 relative
    # per step; 4 AdamW steps of lr 1e-2 move the weights by ~1e-2, so 1e-5 is far below any real difference.
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=0, msg=name)
    assert any(not torch.equal(t, torch.zeros_like(t)) for n, t in two.items() if "lora_B" in n)  # it trained
    files = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*"))
    assert files == sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*"))


def test_nproc_batch_must_split_over_the_processes(setup, tmp_path):  # noqa: F811
    base_dir, data = setup
    config = tmp_path / "lora.yaml"
    config.write_text("seed: 0\n")
    for extra in (["batch_size=3"], ["batch_size=4", "micro_batch_size=1"]):
        result = CliRunner().invoke(app, ["finetune", "run", str(config), "--nproc", "2",
                                          *overrides(base_dir, data, tmp_path / "r", *extra)])
        assert isinstance(result.exception, ConfigError)
        assert "must be multiples of --nproc (2)" in str(result.exception)
    assert not (tmp_path / "r").exists()  # refused before torchrun starts
