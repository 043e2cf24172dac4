"""examples/vision in miniature: prepare -> train (the Trainer) -> evaluate -> serve PNG bytes -> query.

The classifier must beat the majority class; the served model, reached by NVIDIA's tritonclient with KServe v2
BYTES inputs of PNGs, must answer what local inference answers; a malformed image and a wrong datatype get a 400
with a message.
"""

import importlib.util
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

httpclient = pytest.importorskip("tritonclient.http")
pytest.importorskip("sklearn")
pytest.importorskip("uvicorn")
from tritonclient.utils import InferenceServerException  # noqa: E402

from deepseek.vision import DeepseekForImageClassification, DeepseekImageProcessor, encode_png  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vision" / "run.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("vision_example.run", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained_run(example, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("vision")
    common = ["--run-dir", str(run_dir), "--quiet"]
    example.main(["prepare", "--limit", "300", "--tiny", *common])
    trained = example.main(["train", "--models", "ours-resnet,sklearn", "--steps", "40", "--batch-size", "32", "--tiny",
                            *common])
    rows = example.main(["evaluate", *common])
    return run_dir, trained, rows


def test_miniature_beats_the_majority_class(trained_run):
    run_dir, trained, rows = trained_run
    assert rows["ours-resnet"]["accuracy"] > rows["majority class"]["accuracy"] + 0.3
    assert rows["logistic-regression"]["accuracy"] > rows["majority class"]["accuracy"]
    assert (run_dir / "models" / "ours-resnet" / "preprocessor_config.json").is_file()
    assert (run_dir / "results.json").is_file()


@pytest.fixture(scope="module")
def server(example, trained_run):
    from deepseek.serve.server import Server

    run_dir = trained_run[0]
    model = DeepseekForImageClassification.from_pretrained(run_dir / "models" / "ours-resnet")
    repo = example.sibling("serving").build_repository(run_dir, backend="torch", model=model)
    with Server(str(repo), port=0, torch_threads=1) as running:
        yield running, model, DeepseekImageProcessor.from_pretrained(run_dir)


def _send(url: str, pngs: list[bytes]) -> np.ndarray:
    client = httpclient.InferenceServerClient(url)
    data = np.empty((len(pngs), 1), dtype=object)
    data[:, 0] = pngs
    image = httpclient.InferInput("image", [len(pngs), 1], "BYTES")
    image.set_data_from_numpy(data, binary_data=True)
    result = client.infer("digits", [image], outputs=[httpclient.InferRequestedOutput("logits", binary_data=True)])
    return result.as_numpy("logits")


def test_served_png_bytes_match_local_inference(example, trained_run, server):
    running, model, processor = server
    url = f"127.0.0.1:{running.port}"
    images = example.digits_data.load(trained_run[0])["x_test"][:12]
    pngs = [encode_png(image) for image in images]
    with torch.no_grad():
        local = model(processor(list(images))).numpy()
    np.testing.assert_allclose(_send(url, pngs[:3]), local[:3], rtol=1e-4, atol=1e-4)  # one request of 3
    with ThreadPoolExecutor(6) as pool:  # concurrent single-image requests: the dynamic batcher joins them
        logits = np.concatenate(list(pool.map(lambda png: _send(url, [png]), pngs)))
    assert (logits.argmax(-1) == local.argmax(-1)).all()
    meta = httpclient.InferenceServerClient(url).get_model_metadata("digits")
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1, 1]}]


def test_bad_images_get_a_400_with_a_message(server):
    running = server[0]
    url = f"127.0.0.1:{running.port}"
    with pytest.raises(InferenceServerException, match="not a readable PNG/JPEG") as caught:
        _send(url, [b"\x89PNG\r\n\x1a\nthis is not a png"])
    assert caught.value.status() == "400"
    client = httpclient.InferenceServerClient(url)
    floats = httpclient.InferInput("image", [1, 1], "FP32")
    floats.set_data_from_numpy(np.zeros((1, 1), np.float32))
    with pytest.raises(InferenceServerException, match="BYTES") as caught:
        client.infer("digits", [floats])
    assert caught.value.status() == "400"


def test_onnx_repository_serves_fp32_and_int8_twins(example, tmp_path):
    """``run.py serve``'s repository: digits (fp32 ONNX) and digits-int8 (the QAT int8 ONNX graph), configured
    alike; a run without the int8 export is told to run compress."""
    import yaml

    serving = example.sibling("serving")
    example.processor(16).save_pretrained(tmp_path)
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "model.onnx").write_bytes(b"fp32 graph")
    with pytest.raises(FileNotFoundError, match=r"onnx-int8/model\.onnx is missing: run .*run\.py compress"):
        serving.build_repository(tmp_path)
    (tmp_path / "onnx-int8").mkdir()
    (tmp_path / "onnx-int8" / "model.onnx").write_bytes(b"int8 graph")
    repo = serving.build_repository(tmp_path)
    assert sorted(p.name for p in repo.iterdir()) == ["digits", "digits-int8"]
    assert (repo / "digits-int8" / "1" / "model.onnx").read_bytes() == b"int8 graph"
    configs = [yaml.safe_load((repo / name / "config.yaml").read_text()) for name in ("digits", "digits-int8")]
    assert configs[0] == configs[1] and configs[0]["backend"] == "onnx"
    assert (repo / "digits-int8" / "1" / "preprocessor_config.json").is_file()
