"""Post-training quantization and QAT: accuracy against fp32, the directory round trip, load/generate/serve."""

import copy
import json

import pytest
import torch

import deepseek as ds
from deepseek.compress.finetune import finetune, finetune_config, validation_perplexity
from deepseek.compress.qat import convert_qat, fake_quantize_weight, is_qat, prepare_qat
from deepseek.compress.quantize import compression_record, quantization_entry, quantize, save_compressed
from deepseek.models.directory import ModelDirectoryError
from deepseek.nn.quantized import (SCHEMES, QuantizedExperts, QuantizedLinear, dequantize_int4_groups,
                                   dequantize_int8_rows, is_quantized, quantize_int4_groups, quantize_int8_rows,
                                   unpack_int4)

# Relative error of the logits (norm of the difference / norm of the fp32 logits) each scheme stays within, and
# the validation-loss increase it may cost, on the trained tiny model. The weight-only schemes compute in bf16
# (their kernels' fast path), so their logits carry bf16 rounding (~3 significant digits) on top of the weights'.
LOGIT_TOLERANCE = {"int8-dynamic": 0.03, "int8-weight": 0.05, "int4-weight": 0.15}
LOSS_TOLERANCE = {"int8-dynamic": 0.01, "int8-weight": 0.01, "int4-weight": 0.05}


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


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
    # int8-dynamic also rounds the activations; the weight-only schemes run their activations in bf16.
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
    assert relative_error(out, reference) < LOGIT_TOLERANCE[scheme]
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
    assert relative_error(real, fake) < (0.01 if scheme == "int8-dynamic" else 0.03)  # int4 runs bf16 activations


def test_qat_recovers_what_int4_ptq_loses(tmp_path, trained_tiny, lm_data):
    """Same start, same data, same steps: QAT's converted model beats PTQ of the plainly fine-tuned one."""
    settings = dict(steps=30, lr=2e-3, batch_size=8, seq_len=64, progress=False, eval_batches=2)
    plain, _ = ds.load(trained_tiny)
    finetune(plain, finetune_config(lm_data, tmp_path / "plain", **settings))
    qat, _ = ds.load(trained_tiny)
    prepare_qat(qat, "int4-weight")
    finetune(qat, finetune_config(lm_data, tmp_path / "qat", **settings))
    convert_qat(qat)

    def loss(m):
        return validation_perplexity(m, lm_data, seq_len=64, max_batches=4)["val_loss"]

    fp32 = loss(plain)
    ptq = loss(quantize(plain, "int4-weight"))
    assert loss(qat) < ptq
    assert ptq > fp32  # int4 does cost something to recover


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
