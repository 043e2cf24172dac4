"""Pipeline parallelism (torch.distributed.pipelining over gloo under torchrun) gives the 1-process run's losses
and weights: pp=2 with 1F1B and GPipe, dp_replicate=2 x pp=2, dp_shard=2 x pp=2 (FSDP stages) and tp=2 x pp=2 on
4 processes; its sharded checkpoints resume in one process and under pp=2 again."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from deepseek.config import ConfigError
from deepseek.parallel.pipeline import PipelineStageModule, check_pipeline_model, stage_layers
from deepseek.models import MoETransformer
from deepseek.models.config import ModelConfig
from deepseek.train.checkpoint import is_sharded_checkpoint
from .runs import assert_same_model, full_shapes, losses, train_single, train_torchrun

STEP5 = "checkpoints/step-00000005"


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_dir):
    return train_single(tmp_path_factory.mktemp("single") / "run", data_dir)


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory, data_dir, config_file):
    """pp=2 with 1F1B, sharded checkpoints at steps 5 and 10."""
    return train_torchrun(2, config_file, tmp_path_factory.mktemp("pp") / "run", data_dir, "parallel.pp=2")


def assert_matches(run_dir, single):
    for a, b in zip(losses(run_dir), losses(single), strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    assert_same_model(run_dir / "model", single / "model")
    assert val_loss(run_dir) == pytest.approx(val_loss(single), abs=1e-5)  # evaluated on the gathered model


def val_loss(run_dir) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "val_loss" in r][-1]["val_loss"]


def from_step5(run: Path, run_dir: Path) -> Path:
    """A run folder holding only ``run``'s step-5 checkpoint and its metrics (steps 6-10 get cut on resume)."""
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / STEP5, run_dir / STEP5)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # A marker on the records the resumed run must keep (a run that restarted from step 0 would rewrite them).
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({**r, "before_resume": True}) + "\n" for r in records))
    return run_dir


def assert_resumed(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["step"] for r in records if r.get("before_resume")] == [1, 2, 3, 4, 5]


def test_two_stages_1f1b_match_one_process(two_stages, single):
    assert is_sharded_checkpoint(two_stages / STEP5)
    assert_matches(two_stages, single)


def test_two_stages_gpipe_match_one_process(tmp_path, data_dir, single, config_file, two_rank_layouts):
    run_dir = train_torchrun(2, config_file, tmp_path / "gpipe", data_dir, "checkpoint.every=0", "parallel.pp=2",
                             "parallel.pp_schedule=GPipe")
    assert_matches(run_dir, single)
    # The layout: the pp ranks see the same rows, so the losses alone would not notice a run that ignored parallel.pp.
    # Stage 0 holds the embedding and block 0, stage 1 block 1, the final norm and the head, under their own names.
    stages = [set(layout["parameters"]) for layout in two_rank_layouts["pp"]]
    full = set(full_shapes())
    assert stages[0] == {n for n in full if n.startswith(("embed.", "blocks.0."))}
    assert stages[1] == {n for n in full if n.startswith(("blocks.1.", "norm.", "lm_head."))}
    assert stages[0] | stages[1] == full


def test_data_parallel_pipelines_match_one_process(tmp_path, data_dir, single, config_file):
    run_dir = train_torchrun(4, config_file, tmp_path / "dp_pp", data_dir, "checkpoint.every=0", "parallel.pp=2",
                             "parallel.dp_replicate=2")
    assert_matches(run_dir, single)


@pytest.mark.dist_slow  # 4 processes; in make test-dist, which .ci/run runs
def test_fully_sharded_pipelines_match_one_process_and_resume_in_one(tmp_path, data_dir, single, config_file):
    """pp=2 x dp_shard=2: each stage module is an FSDP root over its dp_shard ranks; the schedule reduce-scatters
    once per step, the clipper's norm sums the stages' DTensor norms, the final model gathers every shard. Its
    DCP checkpoint (DTensor shards of two stages) resumes in one process."""
    run_dir = train_torchrun(4, config_file, tmp_path / "fsdp_pp", data_dir, "parallel.pp=2", "parallel.dp_shard=2")
    assert is_sharded_checkpoint(run_dir / STEP5)
    assert_matches(run_dir, single)
    one = train_single(from_step5(run_dir, tmp_path / "one"), data_dir, "checkpoint.resume=true")
    assert_resumed(one)
    assert_matches(one, single)


@pytest.mark.dist_slow  # 4 processes; in make test-dist, which .ci/run runs
def test_tensor_parallel_pipelines_match_one_process_and_resume_in_one(tmp_path, data_dir, config_file):
    """pp=2 x tp=2: each stage's blocks sliced over its tp ranks (a dense first block on stage 0, routed and shared
    experts on stage 1); optimizer.eps=1e-6 as in test_fsdp_tp (last-bit differences of tp's partial sums)."""
    extra = ("model.first_k_dense=1", "model.n_shared_experts=1", "model.shared_ffn_dim=64", "optimizer.eps=1e-6")
    reference = train_single(tmp_path / "single", data_dir, "checkpoint.every=0", *extra)
    run_dir = train_torchrun(4, config_file, tmp_path / "tp_pp", data_dir, *extra, "parallel.pp=2", "parallel.tp=2")
    assert_matches(run_dir, reference)
    one = train_single(from_step5(run_dir, tmp_path / "one"), data_dir, *extra, "checkpoint.resume=true")
    assert_resumed(one)
    assert_matches(one, reference)


@pytest.mark.dist_slow  # 4 processes; in make test-dist, which .ci/run runs
def test_four_stages_match_one_process(tmp_path, data_dir, config_file):
    """Two middle stages (hidden states in and out): 4 layers on 4 ranks, 4 micro-batches for 1F1B."""
    extra = ("checkpoint.every=0", "model.n_layers=4", "micro_batch_size=2")
    reference = train_single(tmp_path / "single", data_dir, *extra)
    run_dir = train_torchrun(4, config_file, tmp_path / "pp4", data_dir, *extra, "parallel.pp=4")
    assert_matches(run_dir, reference)


def test_pipeline_checkpoint_resumes_in_one_process_and_in_the_pipeline(tmp_path, data_dir, config_file, two_stages,
                                                                        single):
    one = train_single(from_step5(two_stages, tmp_path / "one"), data_dir, "checkpoint.resume=true")
    assert_resumed(one)
    assert_matches(one, single)
    pp = train_torchrun(2, config_file, from_step5(two_stages, tmp_path / "pp"), data_dir, "checkpoint.resume=true",
                        "parallel.pp=2")
    assert_resumed(pp)
    assert_matches(pp, single)


def test_stage_split_and_errors():
    assert [list(stage_layers(5, 2, s)) for s in range(2)] == [[0, 1, 2], [3, 4]]
    assert [list(stage_layers(4, 4, s)) for s in range(4)] == [[0], [1], [2], [3]]
    with pytest.raises(ConfigError, match="pp=3 needs at least 3 layers .* n_layers=2"):
        check_pipeline_model(MoETransformer(ModelConfig(n_layers=2)), 3)
    for bad in (dict(attention="sparse"), dict(tie_embeddings=True), dict(aux_loss_coef=0.01)):
        with pytest.raises(ConfigError, match="parallel.pp"):
            check_pipeline_model(MoETransformer(ModelConfig(**bad)), 2)


def test_stages_chained_are_the_model():
    """The stage modules, run one after the other, give the model's logits (one process, no schedule)."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=3)
    model = MoETransformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    want = model(ids)
    stages = [PipelineStageModule(model, stage_layers(3, 2, s), s == 0, s == 1) for s in range(2)]
    torch.testing.assert_close(stages[1](stages[0](ids)), want, atol=1e-6, rtol=0)
