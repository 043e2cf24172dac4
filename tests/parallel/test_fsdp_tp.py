"""FSDP2 (parallel.dp_shard), tensor parallelism (parallel.tp) and their composition give the 1-process run's
losses and final weights; a model that tp cannot split is a ConfigError before training."""

import pytest

from deepseek.config import ConfigError
from deepseek.parallel.tensor_parallel import check_tensor_parallel
from deepseek.models import ModelConfig, MoETransformer
from .runs import FULL_MODEL, assert_same_model, full_shapes, losses, train_single, train_torchrun

NO_CHECKPOINTS = ("checkpoint.every=0",)
# A dense first layer and a shared expert: attention, dense MLP, shared and routed experts all go through tp.
# optimizer.eps=1e-6: Adam's g / (sqrt(v) + eps) turns last-bit differences of a near-zero gradient (the tp
# ranks sum partial products in another order) into visible weight differences at eps=1e-8.


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_dir):
    return train_single(tmp_path_factory.mktemp("single") / "run", data_dir, *NO_CHECKPOINTS)


@pytest.fixture(scope="module")
def single_full(tmp_path_factory, data_dir):
    return train_single(tmp_path_factory.mktemp("single_full") / "run", data_dir, *NO_CHECKPOINTS, *FULL_MODEL)


def assert_same_run(run_dir, reference):
    for a, b in zip(losses(run_dir), losses(reference), strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    assert_same_model(run_dir / "model", reference / "model")


def test_fsdp_two_shards_match_one_process(tmp_path, data_dir, config_file, single):
    run_dir = train_torchrun(2, config_file, tmp_path / "fsdp", data_dir, *NO_CHECKPOINTS, "parallel.dp_shard=2")
    assert_same_run(run_dir, single)


# The dimension tensor parallelism splits, by parameter-name suffix; every other parameter is whole on each rank.
TP_SPLIT = {"attn.q.weight": 0, "attn.k.weight": 0, "attn.v.weight": 0, "attn.o.weight": 1, "gate.weight": 0,
            "up.weight": 0, "down.weight": 1, "experts.gate_up": 1, "experts.down": 2}


def assert_tensor_parallel_layout(layouts, tp, *extra):
    """Each rank holds 1/tp of the split dimension of every attention, MLP and expert weight, as a DTensor sharded
    on the tp mesh dimension (the innermost), and the rest whole: the tp ranks see the same rows, so the losses
    alone would not notice a layout that ignored parallel.tp."""
    full = full_shapes(*extra)
    split = [name for name in full if any(name.endswith(suffix) for suffix in TP_SPLIT)]
    assert {s for s in TP_SPLIT if any(n.endswith(s) for n in split)} == set(TP_SPLIT)  # each kind is in the model
    for layout in layouts:
        assert layout["layout"].endswith(f"tp={tp}")
        for name, shape in full.items():
            local = layout["parameters"][name]
            dim = next((d for suffix, d in TP_SPLIT.items() if name.endswith(suffix)), None)
            want = [n // tp if i == dim else n for i, n in enumerate(shape)]
            assert local["shape"] == want, (layout["rank"], name, local, shape)
            if dim is not None:
                assert local["placements"][-1].lstrip("_").startswith("S("), (name, local)


def test_tensor_parallel_matches_one_process(tmp_path, data_dir, config_file, single_full, two_rank_layouts):
    run_dir = train_torchrun(2, config_file, tmp_path / "tp", data_dir, *NO_CHECKPOINTS, *FULL_MODEL, "parallel.tp=2")
    assert_same_run(run_dir, single_full)
    assert_tensor_parallel_layout(two_rank_layouts["tp"], 2, *FULL_MODEL)


def test_fsdp_times_tensor_parallel_matches_one_process(tmp_path, data_dir, config_file, single_full):
    run_dir = train_torchrun(4, config_file, tmp_path / "fsdp_tp", data_dir, *NO_CHECKPOINTS, *FULL_MODEL,
                             "parallel.dp_shard=2", "parallel.tp=2")
    assert_same_run(run_dir, single_full)


def test_a_model_tp_cannot_split_is_a_config_error():
    model = MoETransformer(ModelConfig(n_heads=4, n_kv_heads=2, first_k_dense=1, n_shared_experts=1))
    check_tensor_parallel(model, 2)
    with pytest.raises(ConfigError, match=r"tp=3 cannot split .*n_heads=4 is not divisible by tp=3"):
        check_tensor_parallel(model, 3)
    with pytest.raises(ConfigError, match="n_kv_heads=2 is not divisible by tp=4"):
        check_tensor_parallel(model, 4)
