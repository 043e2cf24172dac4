"""Static int8 (torchao pt2e) of the digits CNN: accuracy kept, ~4x smaller weights, a pickle-free round trip."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from deepseek.compress.static_int8 import load_static_int8, quantize_static_int8, save_static_int8
from deepseek.models.directory import ModelDirectoryError

pytest.importorskip("sklearn")
pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def digits(digits_example):
    """The example's CNN trained 150 steps (its recipe: AdamW 3e-3, batch 64; ~0.5 s) and the test split."""
    ex = digits_example
    x_train, y_train, x_test, y_test = ex.load_digits_split()
    torch.manual_seed(0)
    model = ex.DigitsCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    batches = ex.EpochBatches(x_train, y_train, 64, seed=0)
    for _ in range(150):
        loss = ex.cross_entropy_loss(model, next(batches))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    calibration = [x_train[i * 64:(i + 1) * 64] for i in range(12)]  # 12 batches of training images
    return model, calibration, x_test, y_test


@pytest.fixture(scope="module")
def quantized(digits):
    model, calibration, x_test, _ = digits
    return quantize_static_int8(model, calibration, x_test[:1], compile=False)


def accuracy(logits, labels):
    return (logits.argmax(-1) == labels).float().mean().item()


def test_int8_keeps_accuracy_and_weights_are_about_4x_smaller(digits, quantized, tmp_path):
    model, _, x_test, y_test = digits
    with torch.no_grad():
        fp32 = accuracy(model(x_test), y_test)
    int8 = accuracy(quantized(x_test), y_test)
    assert fp32 >= 0.97
    assert int8 >= fp32 - 0.005  # at most one of the 360 test images lost (measured: none)
    assert quantized(x_test[:1]).shape == (1, 10) and quantized(x_test[:7]).shape == (7, 10)  # dynamic batch

    folder = save_static_int8(quantized, tmp_path / "int8")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "fp32.safetensors"))
    fp32_bytes = (tmp_path / "fp32.safetensors").stat().st_size
    int8_bytes = (folder / "model.safetensors").stat().st_size
    # int8 weights + fp32 biases + per-channel fp32 scales and int64 zero points (+ the safetensors header):
    # 3.4x for this 14k-parameter model; the per-channel overhead is what keeps it below 4x.
    assert fp32_bytes / int8_bytes > 3.2, (fp32_bytes, int8_bytes)
    int8_weights = [t for t in quantized.exported.state_dict.values() if t.dtype == torch.int8]
    assert sum(t.numel() for t in int8_weights) == sum(
        m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    info = json.loads((folder / "compression.json").read_text())
    assert info["method"] == "static-int8" and info["calibration_batches"] == 12
    assert info["input_shape"] == [None, 1, 8, 8]


def test_round_trip_is_identical_and_never_unpickles(digits, quantized, tmp_path, monkeypatch):
    _, _, x_test, _ = digits
    folder = save_static_int8(quantized, tmp_path / "int8")

    def refuse(*args, **kwargs):
        raise AssertionError("the loader unpickled something")

    for owner, name in ((pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(owner, name, refuse)
    loaded = load_static_int8(folder, compile=False)
    monkeypatch.undo()
    assert torch.equal(loaded(x_test), quantized(x_test))
    assert torch.equal(loaded(x_test[:1]), quantized(x_test[:1]))


@pytest.mark.slow  # ~6 s with a warm inductor cache, ~19 s cold
@pytest.mark.filterwarnings("ignore:To copy construct from a tensor:UserWarning")  # inside inductor's int8 lowering
def test_compiled_int8_matches_the_reference_program_and_reloads_compiled(digits, tmp_path):
    model, calibration, x_test, y_test = digits
    compiled = quantize_static_int8(model, calibration[:8], x_test[:1])
    reference = compiled.program(x_test)
    out = compiled(x_test)
    # The compiled graph fuses requantization into the oneDNN kernels: not bit-identical to the reference.
    torch.testing.assert_close(out, reference, atol=0.05, rtol=0.0)
    assert (out.argmax(-1) == reference.argmax(-1)).float().mean().item() >= 0.99
    assert accuracy(out, y_test) >= accuracy(reference, y_test) - 0.005
    loaded = load_static_int8(save_static_int8(compiled, tmp_path / "int8"))
    assert loaded.compiled is not None
    assert torch.equal(loaded(x_test), out)


def test_broken_or_unsafe_folders_give_errors_naming_the_file(quantized, tmp_path):
    folder = save_static_int8(quantized, tmp_path / "int8")
    compression = folder / "compression.json"
    good = compression.read_text()

    compression.write_text("{not json")
    with pytest.raises(ModelDirectoryError, match=r"compression\.json is corrupt"):
        load_static_int8(folder, compile=False)
    compression.write_text(json.dumps({**json.loads(good), "method": "int8-dynamic"}))
    with pytest.raises(ModelDirectoryError, match=r"compression\.json: method 'int8-dynamic' is not 'static-int8'"):
        load_static_int8(folder, compile=False)
    compression.write_text(json.dumps({**json.loads(good), "input_shape": "8x8"}))
    with pytest.raises(ModelDirectoryError, match=r"compression\.json is corrupt: input_shape"):
        load_static_int8(folder, compile=False)
    compression.write_text(good)

    program_file = folder / "program.json"
    program = json.loads(program_file.read_text())

    def load_with(changed) -> None:
        program_file.write_text(json.dumps(changed))
        load_static_int8(folder, compile=False)

    evil = json.loads(json.dumps(program))
    evil["graph_module"]["graph"]["nodes"][0]["target"] = "torch.hub.load"
    with pytest.raises(ModelDirectoryError, match=r"program\.json: operator 'torch.hub.load' is not allowed"):
        load_with(evil)
    evil = {**program, "guards_code": ["__import__('os').system('true')"]}
    with pytest.raises(ModelDirectoryError, match=r"program\.json: guards_code is not allowed"):
        load_with(evil)
    text = json.dumps(program)
    assert "expr_str" in text  # the dynamic batch size is a sympy expression string...
    evil = json.loads(text.replace("Symbol(", "__import__('os').getcwd() or Symbol(", 1))
    with pytest.raises(ModelDirectoryError, match=r"program\.json: symbolic size .* is not allowed"):
        load_with(evil)  # ...which sympy would eval
    program_file.write_text(json.dumps(program))
    (folder / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ModelDirectoryError, match=r"model\.safetensors is corrupt"):
        load_static_int8(folder, compile=False)


def test_activations_are_7_bit_where_int8_products_saturate(digits, tmp_path, monkeypatch):
    """Without VNNI oneDNN's u8 x s8 pairs saturate 16-bit sums (2 * 255 * 127 > 32,767): there activations
    are quantized to 0..127 (reduce_range), chosen by the CPU unless given, recorded, and warned about at load."""
    from deepseek.compress import static_int8

    model, calibration, x_test, _ = digits

    def activation_ranges(qmodel):
        return {node.args[4] for node in qmodel.exported.graph.nodes
                if node.op == "call_function" and "quantize_per_tensor" in str(node.target)}

    monkeypatch.setattr(static_int8, "int8_saturates_here", lambda: True)
    reduced = quantize_static_int8(model, calibration[:2], x_test[:1], compile=False)
    assert reduced.info["reduce_range"] is True and activation_ranges(reduced) == {127}
    full = quantize_static_int8(model, calibration[:2], x_test[:1], compile=False, reduce_range=False)
    assert full.info["reduce_range"] is False and activation_ranges(full) == {255}
    folder = save_static_int8(full, tmp_path / "int8")
    with pytest.warns(UserWarning, match="8-bit activations, but this CPU's int8 products saturate"):
        load_static_int8(folder)


def test_qat_trains_through_fake_quantization_and_converts(digits, tmp_path):
    """pt2e QAT: the prepared model trains (train/eval switch), converts to the same saved static-int8 format.
    A conv net without BatchNorm keeps this fast (convert_pt2e's conv-BN QAT folding takes ~10 s per model)."""
    from torch import nn

    from deepseek.compress.static_int8 import convert_static_int8_qat, prepare_static_int8_qat

    x_test, y_test = digits[2], digits[3]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10))
    qat = prepare_static_int8_qat(model, x_test[:1])
    assert isinstance(qat, nn.Module) and not any(isinstance(m, nn.Conv2d) for m in qat.modules())
    optimizer = torch.optim.AdamW(qat.parameters(), lr=3e-3)
    qat.train()
    for images, labels in zip(x_test[:320].split(64), y_test[:320].split(64)):  # a few steps: it learns
        loss = torch.nn.functional.cross_entropy(qat(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    qat.eval()
    with torch.no_grad():
        fake = qat(x_test)
    converted = convert_static_int8_qat(qat, compile=False)
    assert converted.info["qat"] is True and converted.info["source_class"].endswith("Sequential")
    assert (converted(x_test).argmax(-1) == fake.argmax(-1)).float().mean() >= 0.95
    assert accuracy(fake, y_test) > 0.3  # chance is 0.1
    loaded = load_static_int8(save_static_int8(converted, tmp_path / "qat"), compile=False)
    torch.testing.assert_close(loaded(x_test), converted(x_test))
