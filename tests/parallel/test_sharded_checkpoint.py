"""Sharded (DCP) checkpoints: written by 2 ranks, resumed by 1 process and by 4 ranks with the uninterrupted
1-process run's losses and weights; exported to a model directory without a process group; a corrupt or
missing shard is an error naming the file."""

import shutil
import warnings
from pathlib import Path

import pytest

from deepseek.parallel.checkpoint import export_model_dir, load_sharded_checkpoint
from deepseek.models.directory import load_config
from deepseek.models.transformer import MoETransformer
from deepseek.train.checkpoint import (CheckpointError, is_sharded_checkpoint, latest_checkpoint, load_checkpoint,
                                       verify_checkpoint)
from .runs import assert_same_model, losses, train_single, train_torchrun

STEP5 = "checkpoints/step-00000005"


# FSDP2 shards the parameters (DTensors) over the 2 ranks that write the checkpoint.
SAVE_LAYOUT = ["parallel.dp_shard=2"]


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_dir):
    """10 uninterrupted steps in one process (plain checkpoints at steps 5 and 10)."""
    return train_single(tmp_path_factory.mktemp("single") / "run", data_dir)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, data_dir, config_file):
    """The same run on 2 ranks, sharded checkpoints every 5 steps; the tests resume from its step 5."""
    return train_torchrun(2, config_file, tmp_path_factory.mktemp("two") / "run", data_dir, *SAVE_LAYOUT)


def from_step5(two_ranks: Path, run_dir: Path) -> Path:
    """A run folder holding only the 2-rank run's step-5 checkpoint and its metrics (steps 6-10 get cut)."""
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(two_ranks / STEP5, run_dir / STEP5)
    shutil.copy(two_ranks / "metrics.jsonl", run_dir / "metrics.jsonl")
    return run_dir


def assert_same_losses(run_dir, reference) -> None:
    for a, b in zip(losses(run_dir), losses(reference), strict=True):
        assert a == pytest.approx(b, abs=1e-5)


def test_two_ranks_write_a_sharded_checkpoint(two_ranks, single):
    step5 = two_ranks / STEP5
    assert is_sharded_checkpoint(step5) and not is_sharded_checkpoint(single / STEP5)
    verify_checkpoint(step5)
    assert sorted(p.name for p in (step5 / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert sorted(p.name for p in (step5 / "model").iterdir()) == ["config.json", "tokenizer.json"]
    assert latest_checkpoint(two_ranks / "checkpoints").name == "step-00000010"
    assert not [p for p in (two_ranks / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporary folders
    assert_same_losses(two_ranks, single)


def test_one_process_resumes_what_two_ranks_wrote(tmp_path, data_dir, two_ranks, single):
    run_dir = from_step5(two_ranks, tmp_path / "run")
    train_single(run_dir, data_dir, "checkpoint.resume=true")
    assert_same_losses(run_dir, single)  # steps 1-5 of the 2-rank run, then 6-10 resumed: the data position too
    assert_same_model(run_dir / "model", single / "model")


def test_four_ranks_resume_what_two_ranks_wrote(tmp_path, data_dir, config_file, two_ranks, single):
    layout = ["parallel.dp_shard=4"]
    run_dir = train_torchrun(4, config_file, from_step5(two_ranks, tmp_path / "run"), data_dir,
                             "checkpoint.resume=true", *layout)
    assert_same_losses(run_dir, single)
    assert_same_model(run_dir / "model", single / "model")
    assert is_sharded_checkpoint(run_dir / "checkpoints/step-00000010")


def test_export_needs_no_process_group(tmp_path, two_ranks, single):
    out = export_model_dir(two_ranks / STEP5, tmp_path / "exported")
    assert_same_model(out, single / STEP5 / "model")  # the 1-process run's plain checkpoint at step 5
    with pytest.raises(CheckpointError, match="plain checkpoint"):
        export_model_dir(single / STEP5, tmp_path / "nope")


def test_a_corrupt_or_missing_shard_is_an_error_naming_the_file(tmp_path, two_ranks):
    root = tmp_path / "checkpoints"
    step5 = root / "step-00000005"
    shutil.copytree(two_ranks / STEP5, step5)
    shard = step5 / "dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp is corrupt"):
        verify_checkpoint(step5)
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*__1_0\.distcp is corrupt"):
        assert latest_checkpoint(root) is None
    shard.unlink()
    model = MoETransformer(load_config(step5 / "model"))
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp is missing"):
        load_sharded_checkpoint(step5, {"model": model})
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp is missing"):
        export_model_dir(step5, tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="cannot read the sharded"):  # unverified: DCP's own error
            load_sharded_checkpoint(step5, {"model": model}, verify=False)
    with pytest.raises(CheckpointError, match="is a sharded checkpoint"):
        load_checkpoint(two_ranks / STEP5, model=model)


def test_a_sharded_layout_resumes_a_plain_checkpoint(tmp_path, data_dir, config_file, single):
    layout = ["parallel.dp_shard=2"]
    run_dir = train_torchrun(2, config_file, from_step5(single, tmp_path / "run"), data_dir,
                             "checkpoint.resume=true", *layout)
    assert_same_losses(run_dir, single)  # each rank kept its pieces of the 1-process run's whole tensors
    assert_same_model(run_dir / "model", single / "model")


def test_expert_parallel_checkpoints_hold_every_expert(tmp_path, data_dir, config_file, single):
    # ep ranks keep plain [E/ep, ...] slices of the experts: read from the plain step-5 checkpoint, saved at
    # step 10 as DTensors over the mesh, so the export has every expert.
    run_dir = train_torchrun(2, config_file, from_step5(single, tmp_path / "ep"), data_dir, "checkpoint.resume=true",
                             "parallel.ep=2")
    assert_same_losses(run_dir, single)
    assert is_sharded_checkpoint(run_dir / "checkpoints/step-00000010")  # auto: ep shards parameters
    assert_same_model(export_model_dir(run_dir / "checkpoints/step-00000010", tmp_path / "exported"), single / "model")
