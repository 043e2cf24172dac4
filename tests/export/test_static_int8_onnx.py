"""ONNX export of a pt2e static int8 model: a QDQ graph with int8 weights and a symbolic batch, equal to the
reference program under onnxruntime, a third of the fp32 bytes, the 0..127 activation clamp kept, and served by
the onnx backend."""

import json

import numpy as np
import pytest
import torch
from torch import nn

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("torchao")

from deepseek.compress.static_int8 import quantize_static_int8  # noqa: E402
from deepseek.export import ExportError, export_static_int8_onnx  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def small_cnn() -> nn.Module:
    """~25k parameters, so the weights (not the graph's structure) dominate the file as in a real model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 64, 3),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():  # trained-looking batch-norm statistics, so folding BN changes the weights
        for bn in (model[1], model[5]):
            bn.running_mean.normal_(0.0, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def quantized():
    """7-bit activations (reduce_range), the case whose clamp the exporter would lose; batches from N(0, 1)."""
    model = small_cnn()
    images = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    return model, quantize_static_int8(model, images.split(16), images[:1], compile=False, reduce_range=True)


@pytest.fixture(scope="module")
def exported(quantized, tmp_path_factory):
    path = tmp_path_factory.mktemp("int8") / "model.onnx"
    example = torch.randn(2, 1, 8, 8)
    return path, export_static_int8_onnx(quantized[1], path, (example,), input_names=["pixel_values"],
                                         output_names=["logits"])


def session(path) -> "ort.InferenceSession":
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def max_diff(path, program, x: torch.Tensor) -> float:
    (got,) = session(path).run(["logits"], {"pixel_values": x.numpy()})
    with torch.no_grad():
        return float(np.abs(got - program(x).numpy()).max())


def test_qdq_graph_with_a_symbolic_batch_matches_the_reference(quantized, exported):
    int8 = quantized[1]
    path, report = exported
    assert [row["shape"] for row in report.validation] == ["batch 1", "batch 5", "batch 64"]
    assert all(row["max_abs_diff"] <= row["allowed"] and row["argmax_agreement"] == 1.0 for row in report.validation)
    assert session(path).get_inputs()[0].shape == ["batch", 1, 8, 8]
    for batch in (1, 3, 64):  # also 3 times the calibration range: the Clips keep the 0..127 clamp
        x = 3 * torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(batch))
        assert max_diff(path, int8.program, x) <= 1e-2
    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1]
    assert sorted(tuple(t.dims) for t in int8_weights) == [(10, 64), (16, 1, 3, 3), (32, 16, 3, 3), (64, 32, 3, 3)]
    info = report.static_int8
    assert info["activation_ranges"] == [[0, 127]] and info["clips_added"] == info["quantize_nodes"] > 0
    meta = json.loads((path.parent / "export.json").read_text())
    assert meta["static_int8"]["clips_added"] == info["clips_added"] and meta["file_bytes"] == report.file_bytes


def test_a_third_of_the_fp32_bytes_without_debug_metadata(quantized, exported):
    model = quantized[0]
    path, report = exported
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert report.file_bytes == path.stat().st_size <= 0.35 * fp32_bytes
    graph_model = onnx.load(str(path))
    assert not graph_model.metadata_props and not graph_model.graph.value_info
    assert not any(node.metadata_props for node in graph_model.graph.node)


def test_without_clips_the_exporter_widens_the_range(quantized, tmp_path):
    """What the Clips are for: the bare export lets 7-bit activations reach 255 above the calibrated range."""
    int8 = quantized[1]
    path = tmp_path / "bare.onnx"
    report = export_static_int8_onnx(int8, path, (torch.randn(2, 1, 8, 8),), input_names=["pixel_values"],
                                     output_names=["logits"], clip_reduced_range=False, validate=False)
    assert report.static_int8["clips_added"] == 0 and report.validation == []
    assert "Clip" not in {node.op_type for node in onnx.load(str(path)).graph.node}
    x = 3 * torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    assert max_diff(path, int8.program, x) > 1e-2


def test_clear_errors(quantized, tmp_path):
    model, int8 = quantized
    with pytest.raises(ExportError, match="expected a StaticInt8Model.*export_onnx"):
        export_static_int8_onnx(model, tmp_path / "m.onnx", (torch.randn(2, 1, 8, 8),))
    with pytest.raises(ExportError, match="must end in .onnx"):
        export_static_int8_onnx(int8, tmp_path / "m.pt", (torch.randn(2, 1, 8, 8),))
    with pytest.raises(ExportError, match="one input and one output"):
        export_static_int8_onnx(int8, tmp_path / "m.onnx", (torch.randn(2, 1, 8, 8),), input_names=["a", "b"])
    assert not (tmp_path / "m.onnx").exists()


def test_served_by_the_onnx_backend(quantized, exported):
    """The int8 graph as ``model.onnx`` of a repository version: the server's onnx backend answers as the
    reference program does, and a wrongly shaped input gets a 400 with a message."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    import shutil

    import yaml

    from deepseek.export import serving_config
    from deepseek.serve.manager import ModelManager
    from deepseek.serve.repository import ModelRepository
    from serve.gated_model import running_server  # tests/serve: the real uvicorn server in a thread

    path, _ = exported
    repo = path.parent / "repo"
    (repo / "digits-int8" / "1").mkdir(parents=True)
    shutil.copyfile(path, repo / "digits-int8" / "1" / "model.onnx")
    config = {**serving_config(path.parent / "export.json", max_batch_size=8), "parameters": {"threads": 1}}
    assert config["inputs"] == [{"name": "pixel_values", "datatype": "FP32", "shape": [1, 8, 8]}]
    (repo / "digits-int8" / "config.yaml").write_text(yaml.safe_dump(config))
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = quantized[1].program(x).numpy()
    with running_server(ModelManager(ModelRepository(repo))) as base, httpx.Client(base_url=base, timeout=30) as http:
        body = {"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [3, 1, 8, 8],
                            "data": x.flatten().tolist()}]}
        r = http.post("/v2/models/digits-int8/infer", json=body)
        assert r.status_code == 200, r.text
        logits = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(expected.shape)
        np.testing.assert_allclose(logits, expected, atol=1e-2 * max(1.0, float(np.abs(expected).max())), rtol=0)
        assert (logits.argmax(-1) == expected.argmax(-1)).all()
        bad = {"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [1, 8, 8], "data": [0.0] * 64}]}
        r = http.post("/v2/models/digits-int8/infer", json=bad)
        assert r.status_code == 400 and "shape" in r.json()["error"]
