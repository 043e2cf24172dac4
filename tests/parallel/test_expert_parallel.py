"""Expert parallelism (all-to-all dispatch) alone and composed with data parallelism gives the 1-process run's
losses and weights."""

import json
import shutil

import pytest
import torch
import torch.distributed as dist

from deepseek.config import ConfigError
from deepseek.parallel.expert_parallel import apply_expert_parallel, check_expert_split
from deepseek.nn.moe import GroupedExperts
from deepseek.train.checkpoint import is_sharded_checkpoint
from .runs import assert_same_model, full_shapes, losses, train_single, train_torchrun

# optimizer.eps=1e-6 in every run here (like the tensor-parallel tests): ep ranks sum each expert's gradient from
# other token groups, so near-zero gradients differ from the 1-process sums in the last bits, and Adam's
# g / (sqrt(v) + eps) turned that into lm_head differences of 2e-6 to >1e-5 at eps=1e-8 (dp2 x ep2, depending on the
# CPU); at 1e-6 the weights agree to 3e-7 and the losses to 3e-7 either way, so it is summation order, not routing.
ADAM_EPS = "optimizer.eps=1e-6"
NO_CHECKPOINTS = ("checkpoint.every=0", ADAM_EPS)
STEP5 = "checkpoints/step-00000005"


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_dir):
    return train_single(tmp_path_factory.mktemp("single") / "run", data_dir, *NO_CHECKPOINTS)


def grad_norms(run_dir) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["grad_norm"] for r in records if "grad_norm" in r]


def assert_matches(run_dir, single):
    for a, b in zip(losses(run_dir), losses(single), strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    # The global norm (each ep rank's expert gradients summed in) before clipping: clipping is active in these runs
    # and AdamW hides a wrong gradient scale from the weights, the norm does not.
    for a, b in zip(grad_norms(run_dir), grad_norms(single), strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    assert_same_model(run_dir / "model", single / "model")


def test_ep2_matches_one_process(tmp_path, data_dir, single, config_file, two_rank_layouts):
    run_dir = train_torchrun(2, config_file, tmp_path / "ep2", data_dir, "parallel.ep=2", *NO_CHECKPOINTS)
    assert_matches(run_dir, single)
    # The layout: each ep rank keeps E/2 of every MoE layer's routed experts and the rest whole.
    full = full_shapes()
    experts = [name for name in full if name.endswith(("experts.gate_up", "experts.down"))]
    assert experts
    for layout in two_rank_layouts["ep"]:
        assert layout["layout"] == "ep=2"
        for name, shape in full.items():
            want = [shape[0] // 2, *shape[1:]] if name in experts else shape
            assert layout["parameters"][name]["shape"] == want, (layout["rank"], name)


def test_dp2_x_ep2_matches_one_process(tmp_path, data_dir, single, config_file):
    run_dir = train_torchrun(4, config_file, tmp_path / "dp2xep2", data_dir, "parallel.ep=2", "parallel.dp_replicate=2",
                             *NO_CHECKPOINTS)
    assert_matches(run_dir, single)


def test_experts_must_divide_by_ep():
    experts = GroupedExperts(n_experts=6, d_model=8, ffn_dim=4)
    check_expert_split([("ffn.experts", experts)], 3)
    with pytest.raises(ConfigError, match="ep=4 does not divide the 6 routed experts"):
        check_expert_split([("ffn.experts", experts)], 4)


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_all_to_all_dispatch_matches_sorted_dispatch(one_rank_group):
    """The exchange path (counts, uneven row all-to-all, regrouping, reverse exchange) on a 1-rank group equals
    the local sorted dispatch, forward and backward."""
    torch.manual_seed(0)
    E, D, F, N, K = 4, 8, 4, 10, 2
    local = GroupedExperts(E, D, F)
    torch.nn.init.normal_(local.gate_up)
    torch.nn.init.normal_(local.down)
    model = torch.nn.ModuleDict({"experts": GroupedExperts(E, D, F)})
    model.experts.load_state_dict(local.state_dict())
    apply_expert_parallel(model, one_rank_group)
    x = torch.randn(N, D)
    weights = torch.rand(N, K, requires_grad=True)
    experts = torch.randint(0, E - 1, (N, K))  # expert E-1 gets no token
    want = local(x, weights, experts)
    got = model.experts(x, weights, experts)
    torch.testing.assert_close(got, want)
    want.square().sum().backward()
    want_grads = [weights.grad.clone(), local.gate_up.grad, local.down.grad]
    weights.grad = None
    got.square().sum().backward()
    for a, b in zip([weights.grad, model.experts.gate_up.grad, model.experts.down.grad], want_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.dist_slow  # 4 processes; in make test-dist, which .ci/run runs
def test_fsdp2_x_ep2_matches_one_process_and_one_process_resumes_it(tmp_path, data_dir, single, config_file):
    """DeepSeek-V3's layout: everything but the routed experts fully sharded over the 4 ranks (dp_shard x ep),
    the experts split over ep; FSDP averages the rest, ExpertGradients sums the experts over dp_shard. Its
    sharded step-5 checkpoint (every expert, once) resumes in one process."""
    run_dir = train_torchrun(4, config_file, tmp_path / "fsdp2xep2", data_dir, "parallel.ep=2", "parallel.dp_shard=2",
                             ADAM_EPS)
    assert_matches(run_dir, single)
    assert is_sharded_checkpoint(run_dir / STEP5)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(run_dir / STEP5, resumed / STEP5)
    shutil.copy(run_dir / "metrics.jsonl", resumed / "metrics.jsonl")
    train_single(resumed, data_dir, "checkpoint.resume=true", "checkpoint.every=0", ADAM_EPS)
    assert_matches(resumed, single)
