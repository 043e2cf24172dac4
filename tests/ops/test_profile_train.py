"""``ds profile train`` on the tiny preset: the breakdown adds up, MFU is the hand count, the trace and profile.json
are what scripts read, a bad config is one line."""

import json
import sys
import warnings

import pytest
import torch
from torch.profiler import profile

import deepseek as ds
from deepseek.ops.breakdown import CATEGORIES, accumulate_points, classify, label_modules, scope
from deepseek.ops.profile_train import expert_load, profile_train
from deepseek.train.config import load_train_config

STEPS, BATCH, SEQ = 2, 4, 64
PEAK_SECONDS = 0.15  # the ceilings' measuring time: short, the tests check arithmetic, not the machine


@pytest.fixture(scope="module")
def profiled(lm_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    config = load_train_config("configs/tiny.yaml", [f"run_dir={out / 'run'}", f"data.path={lm_data}",
                                                     f"batch_size={BATCH}", f"data.seq_len={SEQ}", "seed=0",
                                                     "micro_batch_size=2"])  # two forwards per step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = profile_train(config, steps=STEPS, warmup=1, out=out, peak_seconds=PEAK_SECONDS).result
    return result, out


def test_profile_json_has_the_keys_scripts_read(profiled):
    result, out = profiled
    saved = json.loads((out / "profile.json").read_text())
    for key in ("kind", "machine", "precision", "peaks", "tokens_per_s", "step_seconds", "mfu", "flops_per_token",
                "n_active_params", "memory", "breakdown", "expert_load", "overhead"):
        assert key in saved, key
    assert saved["kind"] == "train" and saved["precision"] == "fp32"
    assert {"cpu_model", "capability", "threads"} <= set(saved["machine"])
    assert set(saved["peaks"]["matmul_flops"]) == {"fp32", "bf16"} and saved["peaks"]["memory_bandwidth_bytes_per_s"] > 0
    assert {"peak_rss_bytes", "steady_rss_bytes"} <= set(saved["memory"])
    assert saved["memory"]["peak_rss_bytes"] >= saved["memory"]["steady_rss_bytes"] > 0
    assert set(saved["breakdown"]) == set(CATEGORIES)
    assert len(saved["plain_step_seconds"]) == len(saved["profiled_step_seconds"]) == STEPS
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_breakdown_sums_to_the_profiled_step(profiled):
    result, _ = profiled
    total = sum(result["breakdown"].values())
    assert total == pytest.approx(result["breakdown_step_seconds"], rel=1e-3)  # every op's self time, once
    wall = sum(result["profiled_step_seconds"]) / STEPS  # the same steps on the wall clock, around train_step
    assert total == pytest.approx(wall, rel=0.25)
    for category in ("matmul", "attention", "moe_routing", "moe_dispatch_combine", "loss_head", "optimizer",
                     "data_loading"):
        assert result["breakdown"][category] > 0, category
    assert result["breakdown"]["communication"] == 0


def test_mfu_is_the_hand_count_over_time_over_peak(profiled):
    result, _ = profiled
    # tiny preset, byte vocabulary 259: per layer q 64x64, k,v 64x32, o 64x64, two norms 64, router 8x64,
    # routed experts top-2 of 8: gate_up 2x256x64 + down 2x64x128; then the final norm 64 and the head 259x64.
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 2 * 64 + 8 * 64 + 2 * 256 * 64 + 2 * 64 * 128
    n_active = 2 * per_layer + 64 + 259 * 64
    assert result["n_active_params"] == n_active == 140_800
    attention = 12 * 2 * 4 * 16 * SEQ  # 12 · layers · heads · head_dim · T
    assert result["flops_per_token"] == 6 * n_active + attention
    tokens_per_s = BATCH * SEQ / result["step_seconds"]
    assert result["tokens_per_s"] == pytest.approx(tokens_per_s)
    peak = result["peaks"]["matmul_flops"]["fp32"]
    assert result["mfu"] == pytest.approx((6 * n_active + attention) * tokens_per_s / peak)
    assert result["mfu_6n"] == pytest.approx(6 * n_active * tokens_per_s / peak)


def test_trace_loads_with_one_profiler_step_per_profiled_step(profiled):
    _, out = profiled
    trace = json.loads((out / "trace.json").read_text())
    steps = [e for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#") and e.get("ph") == "X"]
    assert len(steps) == STEPS + 1  # the profiled step of each cycle, then the one recorded with shapes and FLOPs
    assert any(e.get("args", {}).get("Input Dims") for e in trace["traceEvents"])  # the shapes step's operands
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"ds::attention", "ds::moe_routing", "ds::loss_head", "ds::data_loading"} <= names


def test_expert_load_counts_every_measured_step(profiled):
    result, _ = profiled
    layers = result["expert_load"]
    assert len(layers) == 2
    for layer in layers:  # top-2 of every token (both micro-batches) of the plain and the profiled step of each cycle
        assert sum(layer["tokens_per_expert"]) == 2 * BATCH * SEQ * 2 * STEPS


def test_expert_load_statistics_are_the_hand_computation():
    rows = expert_load(torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]]))
    assert rows[0]["cv"] == 0.0 and rows[0]["max_over_mean"] == 1.0
    assert rows[1]["cv"] == pytest.approx(3 ** 0.5) and rows[1]["max_over_mean"] == 4.0  # std 1.732 / mean 1


def test_backward_ops_take_their_forward_scope():
    """SDPA's backward is attention's and the fused loss's backward is loss_head's, though no scope is open in
    backward: the autograd node's sequence number leads back to the forward op."""
    model = ds.MoETransformer(ds.preset("tiny"))
    ids = torch.randint(0, 259, (2, 16))
    model(ids, targets=ids).backward()
    with profile(record_shapes=True) as prof, label_modules(model):
        with scope("data_loading"):
            ids = torch.randint(0, 259, (2, 16))
        model(ids, targets=ids).backward()
    events = prof.events()
    categories = classify(events)
    by_name = {}
    for e in events:
        by_name.setdefault(e.name, set()).add(categories[e.id])
    backward_attention = [n for n in by_name if "scaled_dot_product" in n and "backward" in n.lower()]
    assert backward_attention and all(by_name[n] == {"attention"} for n in backward_attention)
    assert by_name["autograd::engine::evaluate_function: _LinearCrossEntropyBackward"] == {"loss_head"}
    assert by_name["aten::randint"] == {"data_loading"}
    assert by_name["aten::_grouped_mm"] == {"matmul"}


def test_bad_config_key_is_one_line(monkeypatch, capsys):
    from deepseek.cli.main import main

    monkeypatch.setattr(sys, "argv", ["ds", "profile", "train", "configs/tiny.yaml", "model.no_such_field=1"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no_such_field" in err and "\n" not in err


def test_roofline_points_count_products_by_hand():
    """Points are (op, shapes) with FLOPs 2·m·k·n (mm), per-row groups (_grouped_mm), 4·B·H·T·S·D (attention)."""
    model = ds.MoETransformer(ds.preset("tiny"))
    ids = torch.randint(0, 259, (2, 16))
    with profile(record_shapes=True) as prof:
        model(ids, targets=ids)  # the training forward (grad enabled: the sorted, grouped expert path)
    points = {}
    accumulate_points(prof.events(), points)
    by_key = {(p.name, p.shapes): p for p in points.values()}
    q_proj = by_key[("aten::mm", "[[32, 64], [64, 64]]")]  # 32 tokens through a 64 -> 64 projection
    assert q_proj.flops == q_proj.calls * 2 * 32 * 64 * 64
    assert q_proj.bytes == q_proj.calls * 4 * (32 * 64 + 64 * 64 + 32 * 64)
    experts = by_key[("aten::_grouped_mm", "[[64, 64], [8, 64, 256]]")]  # 32 tokens x top-2 rows, gate_up
    assert experts.flops == experts.calls * 2 * 64 * 64 * 256
    attention = [p for p in points.values() if "scaled_dot_product" in p.name]
    assert attention and all(p.flops == p.calls * 4 * 2 * 4 * 16 * 16 * 16 for p in attention)  # B H T S D


def test_two_processes_are_profiled_rank_by_rank_with_their_collectives(lm_data, tmp_path):
    """`ds profile train --nproc 2` re-launches itself under torchrun, as `ds train --nproc 2` does: each rank
    profiles the same data-parallel steps, rank 0 into --out, rank 1 into --out/rank1, and DDP's gradient
    all-reduce shows up as communication."""
    from tests.parallel.runs import run_cmd

    out = tmp_path / "profile"
    run_cmd([sys.executable, "-m", "deepseek.cli.main", "profile", "train", "configs/tiny.yaml",
             f"run_dir={tmp_path / 'run'}", f"data.path={lm_data}", f"batch_size={BATCH}", f"data.seq_len={SEQ}",
             "seed=0", "progress=false", "--steps", "1", "--warmup", "1", "--out", out, "--nproc", "2",
             "--peak-seconds", PEAK_SECONDS])
    ranks = [json.loads((out / "profile.json").read_text()), json.loads((out / "rank1" / "profile.json").read_text())]
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    for result in ranks:
        assert result["tokens_per_step"] == BATCH // 2 * SEQ  # each rank takes its half of the global batch
        assert result["job_tokens_per_s"] == pytest.approx(2 * result["tokens_per_s"])
        assert result["breakdown"]["communication"] > 0
    assert (out / "trace.json").is_file() and (out / "rank1" / "trace.json").is_file()
