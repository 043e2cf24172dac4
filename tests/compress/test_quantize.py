"""Post-training quantization and QAT: accuracy against fp32, the directory round trip, load/generate/serve."""

import copy
import json

import pytest
import torch

import deepseek as ds
from deepseek.compress.finetune import validation_perplexity
from deepseek.compress.qat import convert_qat, fake_quantize_weight, is_qat, prepare_qat
from deepseek.compress.quantize import compression_record, quantization_entry, quantize, save_compressed
from deepseek.models.directory import ModelDirectoryError
from deepseek.nn.quantized import (SCHEMES, QuantizedExperts, QuantizedLinear, dequantize_int4_groups,
                                   dequantize_int8_rows, is_quantized, quantize_int4_groups, quantize_int8_rows,
                                   unpack_int4)

# Relative error of the outputs (norm of the difference / norm of the fp32 outputs) each scheme stays within in one
# layer, and the validation-loss increase it may cost on the trained tiny model. Where bf16 products are fast the
# weight-only schemes run bf16 activations (their kernels' fast path), so their outputs carry bf16 rounding
# (~3 significant digits) on top of the weights'; elsewhere they dequantize and run fp32.
LOGIT_TOLERANCE = {"int8-dynamic": 0.03, "int8-weight": 0.05, "int4-weight": 0.15}
LOSS_TOLERANCE = {"int8-dynamic": 0.01, "int8-weight": 0.01, "int4-weight": 0.05}
# A whole MoE model, per token. Any rounding flips the top-k experts of a few tokens, whose logits then move by
# 20-70 %; how many depends on the model (2-6 of the 144 tokens below on fixtures trained on AVX-512 and on AVX2),
# so the error over all logits counts flips (0.022 vs 0.046 for the same int8-dynamic arithmetic). The typical
# token's error (median) says what the arithmetic costs, the share of tokens off by more than 10 % how many flip.
# (Measured: int8 medians 0.003, int4 0.025; int8-dynamic on AVX2 through the saturating _int_mm: 0.026.)
TOKEN_TOLERANCE = {"int8-dynamic": 0.01, "int8-weight": 0.01, "int4-weight": 0.05}
FLIPPED_SHARE = {"int8-dynamic": 0.06, "int8-weight": 0.06, "int4-weight": 0.2}


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def token_errors(a, b):
    """Relative error of each token's logits: [tokens]."""
    return ((a.float() - b.float()).norm(dim=-1) / b.float().norm(dim=-1)).flatten()


def quantized_dir(tmp_path, source, scheme):
    model, tokenizer = ds.load(source)
    quantize(model, scheme)
    record = compression_record(scheme, source=source, quantization=quantization_entry(scheme))
    return save_compressed(model, tokenizer, tmp_path / scheme, record, source=source)


def test_int8_and_int4_formats_round_trip_within_their_step():
    w = torch.randn(48, 96)
    q, scale = quantize_int8_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (48,)
    assert ((dequantize_int8_rows(q, scale) - w).abs() <= scale[:, None] / 2 + 1e-6).all()
    packed, scale4, minimum = quantize_int4_groups(w, 32)
    assert packed.dtype == torch.uint8 and packed.shape == (48, 48) and scale4.shape == (48, 3)
    assert unpack_int4(packed).max() <= 15
    step = scale4.repeat_interleave(32, dim=1)
    assert ((dequantize_int4_groups(packed, scale4, minimum) - w).abs() <= step / 2 + 1e-5).all()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_linear_matches_its_dequantized_weight(scheme):
    linear = torch.nn.Linear(64, 48, bias=True)
    x = torch.randn(5, 3, 64)
    module = QuantizedLinear.from_linear(linear, scheme)
    reference = torch.nn.functional.linear(x, module.weight_q.dequantize(), linear.bias)
    # int8-dynamic also rounds the activations; the weight-only schemes run bf16 activations where bf16 is fast.
    assert relative_error(module(x), reference) < (0.01 if scheme == "int8-dynamic" else 0.006)
    assert relative_error(module(x), linear(x)) < LOGIT_TOLERANCE[scheme]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_model_stays_close_to_fp32_and_round_trips(tmp_path, trained_tiny, lm_data, scheme):
    original, _ = ds.load(trained_tiny)
    path = quantized_dir(tmp_path, trained_tiny, scheme)
    loaded, tokenizer = ds.load(path)
    assert is_quantized(loaded)
    assert any(isinstance(m, QuantizedExperts) for m in loaded.modules())
    assert json.loads((path / "compression.json").read_text())["quantization"]["scheme"] == scheme

    ids = torch.randint(0, 259, (3, 48))
    with torch.no_grad():
        reference, out = original(ids), loaded(ids)
        in_memory = quantize(copy.deepcopy(original), scheme)(ids)
    assert torch.equal(out, in_memory)  # what was saved is what loads
    errors = token_errors(out, reference)
    assert errors.median() < TOKEN_TOLERANCE[scheme], errors.median()
    assert (errors > 0.1).float().mean() < FLIPPED_SHARE[scheme], errors.sort().values[-10:]
    base = validation_perplexity(original, lm_data, seq_len=64, max_batches=4)["val_loss"]
    quantized = validation_perplexity(loaded, lm_data, seq_len=64, max_batches=4)["val_loss"]
    assert quantized <= base * (1 + LOSS_TOLERANCE[scheme])
    assert loaded.num_parameters() == original.num_parameters()  # logical weights, not bytes

    # decoding (KV cache, one-token expert path) runs on the quantized modules
    text = ds.generate(loaded, tokenizer, "def ", max_new_tokens=8, temperature=0.0)
    assert text.completion_tokens == 8


def test_quantized_weights_are_smaller_on_disk(tmp_path, trained_tiny):
    fp32 = (trained_tiny / "model.safetensors").stat().st_size
    int8 = (quantized_dir(tmp_path, trained_tiny, "int8-dynamic") / "model.safetensors").stat().st_size
    int4 = (quantized_dir(tmp_path, trained_tiny, "int4-weight") / "model.safetensors").stat().st_size
    # tiny is 64 wide: per-row scales and the fp32 norms weigh more than in real models (quickstart: 0.26x, 0.19x)
    assert int8 < 0.33 * fp32
    assert int4 < 0.25 * fp32


@pytest.mark.parametrize("scheme", ["int8-dynamic", "int4-weight"])
def test_quantized_directory_is_served_unchanged(tmp_path, trained_tiny, scheme):
    """A real server (uvicorn + the OpenAI-compatible API) serves the quantized directory as it is."""
    import httpx

    from deepseek.serve.manager import ModelManager
    from deepseek.serve.repository import ModelRepository
    from tests.serve.gated_model import running_server

    model, tokenizer = ds.load(trained_tiny)
    quantize(model, scheme)
    root = tmp_path / "repo"
    save_compressed(model, tokenizer, root / "quantized" / "1",
                    compression_record(scheme, source=trained_tiny, quantization=quantization_entry(scheme)))
    expected = ds.generate(model, tokenizer, "def add(a, b):", max_new_tokens=10, temperature=0.0, ignore_eos=True)
    with running_server(ModelManager(ModelRepository(root))) as base:
        reply = httpx.post(f"{base}/v1/completions", timeout=60,
                           json={"model": "quantized", "prompt": "def add(a, b):", "max_tokens": 10,
                                 "temperature": 0, "ignore_eos": True})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] == expected.text
    assert reply.json()["usage"]["completion_tokens"] == 10


def test_corrupt_compression_json_names_the_file(tmp_path, trained_tiny):
    path = quantized_dir(tmp_path, trained_tiny, "int8-weight")
    (path / "compression.json").write_text("{not json")
    with pytest.raises(ModelDirectoryError, match="compression.json is corrupt"):
        ds.load(path)
    (path / "compression.json").write_text(json.dumps({"method": "x", "quantization": {"scheme": "int3"}}))
    with pytest.raises(ModelDirectoryError, match="compression.json is corrupt: quantization.scheme must be one of"):
        ds.load(path)


def test_quantize_rejects_bad_arguments(trained_tiny):
    model, _ = ds.load(trained_tiny)
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3'"):
        quantize(model, "int3")
    with pytest.raises(ValueError, match="group_size"):
        quantize(model, "int4-weight", group_size=24)
    quantize(model, "int8-weight")
    with pytest.raises(ValueError, match="already quantized"):
        quantize(model, "int8-weight")


def test_fake_quantization_passes_gradients_straight_through():
    w = torch.randn(32, 64, requires_grad=True)
    fake_quantize_weight(w, "int4-weight").sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


@pytest.mark.parametrize("scheme", ["int8-dynamic", "int4-weight"])
def test_qat_converts_to_what_it_trained(trained_tiny, scheme):
    model, _ = ds.load(trained_tiny)
    prepare_qat(model, scheme)
    assert is_qat(model)
    ids = torch.randint(0, 259, (2, 40))
    with torch.no_grad():
        fake = model(ids)
        real = convert_qat(model)(ids)
    assert not is_qat(model) and is_quantized(model)
    # int4: bf16 activations where bf16 is fast
    assert relative_error(real, fake) < (0.01 if scheme == "int8-dynamic" else 0.03)


def _fit(model, x, y, steps, lr):
    """``steps`` full-batch AdamW steps on one fixed batch (deterministic: no sampling, no dropout)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(x, targets=y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def _outlier_channels(model, channels=(0, 7), factor=16.0):
    """Give the inputs ``channels`` of every quantized product the outlier scale real LLMs show (LLM.int8(),
    SmoothQuant): weights x ``factor``, the RMSNorm weight before them / ``factor`` (the router's columns too).
    The same function exactly (powers of two); their int4 groups are stretched, the other weights there coarsened."""
    ch = list(channels)
    for block in model.blocks:
        block.attn_norm.weight[ch] /= factor
        for linear in (block.attn.q, block.attn.k, block.attn.v):
            linear.weight[:, ch] *= factor
        block.ffn_norm.weight[ch] /= factor
        block.ffn.experts.gate_up[:, :, ch] *= factor
        block.ffn.router.weight[:, ch] *= factor
    model.norm.weight[ch] /= factor
    model.lm_head.weight[:, ch] *= factor
    return model


def test_qat_recovers_what_int4_ptq_loses(trained_tiny):
    """Same start, same data, same steps: QAT's converted int4 model beats PTQ of the plainly fine-tuned one.

    The start must hold something int4 can lose. Fine-tuned on lm_data for 30 steps (this test's first form), the
    tiny model is barely past byte frequencies: int4 PTQ moved its validation loss by -0.002..+0.007 nats over 4
    seeds and 30-120 steps, while two fine-tunes from one start (plain and QAT) end 0.01-0.03 nats apart, so
    `ptq > fp32` and `qat < ptq` were coin flips (ptq 2.7833 < fp32 2.7842 on one machine). Here the model first
    fits a fixed batch of real source text (sharp predictions), then gets outlier input channels (same function);
    measured over 6 text windows, on AVX-512 and under AVX2 emulation: PTQ costs 0.13-0.37 nats, and 40 QAT steps
    recover 45-75 % of it where 40 plain steps from the same start recover none. The asserted margins are a third
    of the smallest measured values; without fake quantization the two runs are identical and the test fails.
    """
    from deepseek.data import python_stdlib_dir

    text = (python_stdlib_dir() / "json" / "decoder.py").read_bytes()
    ids = torch.tensor(list(text[:8 * 65]), dtype=torch.long).view(8, 65)
    x, y = ids[:, :-1], ids[:, 1:]
    start, _ = ds.load(trained_tiny)
    _outlier_channels(_fit(start, x, y, steps=40, lr=3e-3))
    state = copy.deepcopy(start.state_dict())

    def fresh():
        model, _ = ds.load(trained_tiny)
        model.load_state_dict(state)
        return model

    def loss(model):
        with torch.no_grad():
            return model(x, targets=y).item()

    plain = _fit(fresh(), x, y, steps=40, lr=3e-4)
    qat = fresh()
    prepare_qat(qat, "int4-weight")
    convert_qat(_fit(qat, x, y, steps=40, lr=3e-4))
    fp32 = loss(plain)
    ptq = loss(quantize(plain, "int4-weight"))
    assert ptq > fp32 + 0.04, (fp32, ptq)                    # int4 does cost something to recover
    assert ptq - loss(qat) > 0.15 * (ptq - fp32), (fp32, ptq, loss(qat))  # and QAT recovers a real share of it


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_experts_decoding_path_equals_the_sorted_path(scheme):
    from deepseek.nn.moe import GroupedExperts

    experts = GroupedExperts(8, 64, 32)
    torch.nn.init.normal_(experts.gate_up, std=0.1)
    torch.nn.init.normal_(experts.down, std=0.1)
    module = QuantizedExperts.from_experts(experts, scheme)
    x = torch.randn(40, 64)
    weights = torch.rand(40, 2)
    choices = torch.stack([torch.randperm(8)[:2] for _ in range(40)])
    sorted_path = module(x, weights, choices)  # 80 pairs: the sorted dispatch
    one_by_one = torch.cat([module(x[i:i + 1], weights[i:i + 1], choices[i:i + 1]) for i in range(40)])
    assert torch.allclose(one_by_one, sorted_path, atol=1e-5)
    reference = experts.forward_reference(x, weights, choices)
    assert relative_error(sorted_path, reference) < LOGIT_TOLERANCE[scheme]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_model_runs_with_gradients_enabled(scheme):
    """Outside no_grad (a user's plain call, or gradients with respect to the input) the model still runs."""
    model = quantize(ds.MoETransformer(ds.preset("tiny")), scheme)
    ids = torch.randint(0, 259, (2, 40))
    logits = model(ids)
    with torch.no_grad():
        assert torch.allclose(logits, model(ids))
