"""``ds plan``: each memory estimate against what the framework really allocates or writes on this machine, the
layouts' sharding against hand arithmetic, and bad input as one-line errors."""

import json
import struct
import sys

import pytest
import torch

import deepseek as ds
from deepseek.data.tokenizer import byte_tokenizer
from deepseek.models.config import ModelConfig
from deepseek.models.transformer import MoETransformer
from deepseek.ops.layout import Layout, LayoutError, parse_layout
from deepseek.ops.memory_model import (activation_bytes, kv_cache_bytes_per_token, saved_activation_bytes,
                                       trainable_tensors, weight_bytes)
from deepseek.ops.plan import PlanError, plan_serving, plan_training, read_profile, training_terms

# A tiny model with every kind of tensor: a dense first layer, MoE layers with a shared expert, GQA.
CFG = ModelConfig(vocab_size=300, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, first_k_dense=1, ffn_dim=128,
                  moe_ffn_dim=32, n_routed_experts=4, top_k=2, n_shared_experts=1, max_seq_len=128)
MEMORY = (64 << 30, "test")


def safetensors_tensor_bytes(path) -> int:
    """Bytes of the tensors in a safetensors file, from its header (8-byte length, then JSON with data_offsets)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return sum(end - start for name, entry in header.items() if name != "__metadata__"
               for start, end in [entry["data_offsets"]])


def by_name(terms):
    return {t.name.split(" (")[0]: t.bytes for t in terms}


# -- (a) KV cache: the engines' real tensors ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_bytes_per_token_equal_the_generate_engines_cache(dtype):
    from deepseek.nn.kv_cache import KVCache

    model = MoETransformer(CFG).to(dtype).eval()
    cache = KVCache.for_model(model, batch_size=3, max_len=40)  # what deepseek.generate's engine allocates
    allocated = cache.k.nbytes + cache.v.nbytes
    assert allocated == kv_cache_bytes_per_token(CFG, dtype) * 3 * 40  # exact


def test_serving_kv_term_equals_the_continuous_engines_preallocated_cache():
    from deepseek.generate.continuous import ContinuousBatchingEngine

    model = MoETransformer(CFG).eval()
    engine = ContinuousBatchingEngine(model, byte_tokenizer(), max_running=5, max_len=96)
    plan = plan_serving(CFG, "fp32", streams=5, context=96, target_tokens_per_s=1000, tokens_per_s=300,
                        throughput_source="test", device_memory=MEMORY)
    assert by_name(plan.terms)["KV cache"] == engine.cache.bytes  # exact: 5 running slots + the staging slot
    assert plan.devices == 4  # ceil(1000 / 300)


# -- (b) weights: the bytes ds.save writes ----------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8-dynamic", "int4-weight"])
def test_weight_bytes_equal_model_safetensors(tmp_path, fmt):
    from deepseek.compress import quantize
    from deepseek.models.directory import save

    model = MoETransformer(CFG)
    if fmt == "bf16":
        model = model.to(torch.bfloat16)
    elif fmt != "fp32":
        quantize(model, fmt, group_size=32)
    save(model, byte_tokenizer(), tmp_path / "m")
    assert weight_bytes(CFG, fmt, group_size=32) == safetensors_tensor_bytes(tmp_path / "m" / "model.safetensors")


# -- (c) training memory: autograd's saved tensors, and the peak RSS of real trainer steps ------------------------

@pytest.mark.parametrize("overrides", [{}, dict(first_k_dense=0, n_shared_experts=0, top_k=1, n_kv_heads=4)])
def test_activation_formula_matches_the_tensors_autograd_saves(overrides):
    cfg = ModelConfig(**{**CFG.to_dict(), **overrides})
    model = MoETransformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (4, 64))
    measured = saved_activation_bytes(model, ids)
    assert activation_bytes(cfg, 4 * 64) == pytest.approx(measured, rel=0.02)  # fitted; 36 configs within 0.4 %


def test_checkpointed_blocks_keep_only_their_inputs():
    model = MoETransformer(CFG)
    model.gradient_checkpointing = True
    ids = torch.randint(0, CFG.vocab_size, (4, 64))
    measured = saved_activation_bytes(model, ids)  # the forward: block inputs, final norm, loss
    d, tokens = CFG.d_model, 4 * 64
    forward_words = tokens * (CFG.n_layers * d + 3 * d + 19) + CFG.vocab_size * d  # the formula's forward part
    assert 4 * forward_words == pytest.approx(measured, rel=0.05)
    # Backward recomputes one block at a time: the plan adds the largest layer (here a MoE layer) once.
    moe_layer = activation_bytes(CFG, tokens, layers=2, head=False) - activation_bytes(CFG, tokens, layers=1,
                                                                                         head=False)
    assert activation_bytes(CFG, tokens, checkpointing=True) == 4 * forward_words + moe_layer


def test_training_memory_estimate_matches_the_peak_rss_of_trainer_steps():
    """Peak RSS increase of two trainer steps (fresh process, kernels paged in before the baseline) vs weights +
    gradients + AdamW + activations + loss chunk. Tolerance 25 %: RSS also holds allocator slack, temporaries of
    backward and Python objects the estimate leaves out (measured ~3 % on this machine at 4 x 256 and 16 x 256)."""
    from deepseek.ops.measure import peak_training_memory

    cfg = ModelConfig(vocab_size=2048, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, moe_ffn_dim=256,
                      n_routed_experts=8, max_seq_len=256)
    rows, seq = 4, 256
    measured = peak_training_memory(cfg, rows, seq)["peak_rss_increase_bytes"]
    terms, _ = training_terms(cfg, Layout(), rows * seq)
    estimate = sum(t.bytes for t in terms)
    assert estimate == pytest.approx(measured, rel=0.25), (estimate, measured)


# -- (d) layouts: sharding arithmetic by hand ---------------------------------------------------------------------

def numel(part=None):
    return sum(t.numel for t in trainable_tensors(CFG) if part is None or t.part == part)


def test_fsdp_divides_weights_gradients_and_optimizer_state_by_n():
    single = by_name(training_terms(CFG, Layout(), 4096)[0])
    fsdp = by_name(training_terms(CFG, parse_layout(["fsdp=4"]), 4096)[0])
    assert single["AdamW state"] == 8 * numel() and single["gradients"] == 4 * numel()
    assert fsdp["AdamW state"] == 8 * numel() / 4 and fsdp["gradients"] == 4 * numel() / 4
    assert fsdp["activations"] == activation_bytes(CFG, 4096 // 4)  # each rank takes a quarter of the rows
    ddp = by_name(training_terms(CFG, parse_layout(["ddp"], devices=4), 4096)[0])
    assert ddp["AdamW state"] == single["AdamW state"]  # replicas hold everything


def test_tensor_expert_and_pipeline_parallel_split_their_parts():
    split_by_tp = numel("attention") + numel("dense_ffn") + numel("shared_experts") + numel("routed_experts")
    tp = by_name(training_terms(CFG, parse_layout(["tp=2"]), 1024)[0])
    # tp runs under FSDP with dp_shard=1: no further division; the sliced parts halve, the rest is replicated.
    assert tp["gradients"] == 4 * (numel() - split_by_tp / 2)
    ep = by_name(training_terms(CFG, parse_layout(["ep=2"]), 1024)[0])
    assert ep["gradients"] == 4 * (numel() - numel("routed_experts") / 2)
    terms, stage = training_terms(CFG, parse_layout(["pp=3"]), 1024, micro_batches=3)
    # Stage 0 (embedding + block 0, 3 micro-batches in flight) or stage 2 (block 2 + norm + head + loss).
    per_stage = {s: sum(t.numel for t in trainable_tensors(CFG) if (t.layer == s) or
                        (s == 0 and t.part == "embedding") or (s == 2 and t.layer is None and t.part != "embedding"))
                 for s in (0, 2)}
    assert by_name(terms)["gradients"] == 4 * per_stage[stage]


def test_layout_parsing_and_the_devices_it_fills():
    assert parse_layout(["fsdp", "tp=2"], devices=8) == Layout(dp_shard=4, tp=2)
    assert parse_layout(["fsdp=2,tp=2"], devices=8) == Layout(dp_replicate=2, dp_shard=2, tp=2)
    assert parse_layout([], devices=3) == Layout(dp_replicate=3)
    assert parse_layout(["fsdp=2", "tp=2"]).data_parallel == 2


@pytest.mark.parametrize("specs, devices, message", [
    (["cp=2"], None, "context parallelism is not implemented"),
    (["zigzag=2"], None, "unknown layout 'zigzag'"),
    (["tp=2", "ep=2"], None, "tp combined with ep"),
    (["fsdp=-2"], None, "must be positive"),
    (["fsdp"], None, "needs --devices"),
    (["fsdp=3"], 8, "uses 3 devices"),
])
def test_bad_layouts_are_one_line_errors(specs, devices, message):
    with pytest.raises(LayoutError, match=message):
        parse_layout(specs, devices)


def test_a_layout_the_model_does_not_split_into_is_refused():
    with pytest.raises(LayoutError, match="n_routed_experts=4 is not divisible by ep=3"):
        training_terms(CFG, parse_layout(["ep=3"]), 1024)


def test_training_devices_for_a_target_step_time():
    plan = plan_training(CFG, Layout(), tokens_per_step=10_000, tokens_per_s_per_device=1_000,
                         throughput_source="test", device_memory=MEMORY, step_time_s=2.0)
    assert plan.devices == 5 and plan.fits  # ceil(10,000 / (1,000 x 2))
    eight = plan_training(CFG, Layout(dp_replicate=8), tokens_per_step=10_000, tokens_per_s_per_device=1_000,
                          throughput_source="test", device_memory=MEMORY, step_time_s=2.0)
    assert eight.devices == 8 and eight.details["devices_for_step_time"] == 5  # the layout already reaches it
    with pytest.raises(PlanError, match="--train-tokens-per-step must be positive"):
        plan_training(CFG, Layout(), tokens_per_step=-5, tokens_per_s_per_device=1_000, throughput_source="test",
                      device_memory=MEMORY)


def test_profile_json_of_the_wrong_kind_is_refused(tmp_path):
    file = tmp_path / "profile.json"
    file.write_text(json.dumps({"kind": "train", "tokens_per_s": 1234.0, "machine": {"cpu": "x"}}))
    assert read_profile(file, "train")[0] == 1234.0
    with pytest.raises(PlanError, match="needs a `ds profile generate` profile"):
        read_profile(file, "generate")


# -- the command ------------------------------------------------------------------------------------------------

def run_cli(monkeypatch, capsys, *args):
    from deepseek.cli import main

    monkeypatch.setattr(sys, "argv", ["ds", "plan", *args])
    with pytest.raises(SystemExit) as exit_info:
        main.main()
    return exit_info.value.code, capsys.readouterr()


def test_cli_plans_a_model_directory_from_a_profile(tmp_path, monkeypatch, capsys):
    ds.save(MoETransformer(CFG), byte_tokenizer(), tmp_path / "m")
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"kind": "generate", "decode_tokens_per_s": 250.0, "machine": {"cpu": "test"}}))
    code, out = run_cli(monkeypatch, capsys, str(tmp_path / "m"), "--serve-tokens-per-s", "1000", "--streams", "2",
                        "--context", "64", "--profile", str(profile), "--device-memory", "1", "--json")
    assert code in (0, None), out.err
    plan = json.loads(out.out)["plans"][0]
    assert plan["devices"] == 4 and plan["fits"]
    assert plan["total_bytes"] == weight_bytes(CFG) + 3 * 64 * kv_cache_bytes_per_token(CFG)


@pytest.mark.parametrize("args, message", [
    (["tiny", "--serve-tokens-per-s", "-5"], "--serve-tokens-per-s must be positive"),
    (["tiny", "--train-tokens-per-step", "1024", "--layout", "cp=2"], "context parallelism is not implemented"),
    (["no-such-model", "--serve-tokens-per-s", "5"], "not a model directory, a config file or a preset"),
    (["tiny"], "give a target"),
])
def test_cli_bad_input_is_one_line(monkeypatch, capsys, args, message):
    code, out = run_cli(monkeypatch, capsys, *args)
    assert code in (1, 2)
    assert message in out.err and "Traceback" not in out.err and len(out.err.strip().splitlines()) == 1


def test_cli_measures_decode_here_without_a_profile(monkeypatch, capsys):
    code, out = run_cli(monkeypatch, capsys, "tiny", "--serve-tokens-per-s", "100", "--streams", "2", "--context",
                        "64", "--threads", "1", "--json")
    assert code in (0, None), out.err
    plan = json.loads(out.out)["plans"][0]
    measured = plan["throughput"]["tokens_per_s_per_replica"]
    assert plan["throughput"]["source"].startswith("measured here: 15 decode steps x 2 streams")
    assert measured > 0 and plan["devices"] == -(-100 // measured)


def test_cli_measures_a_training_step_here_and_plans_fsdp(monkeypatch, capsys):
    code, out = run_cli(monkeypatch, capsys, "tiny", "--train-tokens-per-step", "512", "--seq-len", "64",
                        "--layout", "fsdp=2", "--threads", "1", "--json")
    assert code in (0, None), out.err
    plan = json.loads(out.out)["plans"][0]
    assert plan["devices"] == 2 and plan["throughput"]["source"].startswith("measured here: 2 trainer steps of 4 x 64")
    tiny = ModelConfig()
    params = sum(t.numel for t in trainable_tensors(tiny))
    assert {t["name"]: t["bytes"] for t in plan["terms"]}["gradients (fp32)"] == 4 * params / 2
