"""BYTES inputs over KServe v2 gRPC: PNGs of digits to the vision example's served model, from tritonclient.grpc
(``raw_input_contents`` in Triton's serialization) and as typed ``bytes_contents``; malformed blobs, corrupt
images, BYTES for a model without ``preprocess`` and oversized requests are refused, and the server goes on.

One server (HTTP and gRPC) over the repository the vision example builds (``serving.build_repository``, torch
backend), with an untrained tiny classifier: the check is that gRPC, HTTP and the model itself agree.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

grpc = pytest.importorskip("grpc")
grpcclient = pytest.importorskip("tritonclient.grpc")
pytest.importorskip("tritonclient.http")
pytest.importorskip("sklearn")
pytest.importorskip("uvicorn")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from deepseek.serve.protocols.grpc_v2 import parse_inputs  # noqa: E402
from deepseek.vision import (DeepseekForImageClassification, DeepseekImageProcessor, VisionConfig,  # noqa: E402
                             encode_png)

from .gated_model import linear_config  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vision"
MAX_REQUEST_MB = 0.25


def _example(name: str):
    """examples/vision/<name>.py, imported by run.py's own ``sibling`` (as ``vision_example.<name>``)."""
    if "vision_example.run" not in sys.modules:
        spec = importlib.util.spec_from_file_location("vision_example.run", EXAMPLE / "run.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["vision_example.run"] = module
        spec.loader.exec_module(module)
    return sys.modules["vision_example.run"].sibling(name)


def _serialized(items: list[bytes]) -> bytes:
    """Triton's BYTES serialization: per element a little-endian uint32 length, then the bytes."""
    return b"".join(len(item).to_bytes(4, "little") + item for item in items)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from deepseek.serve.server import Server

    run_dir = tmp_path_factory.mktemp("vision-grpc")
    _example("data").prepare(run_dir, limit=20)
    processor = DeepseekImageProcessor(size=16, crop_size=16, num_channels=1, image_mean=[0.5], image_std=[0.5])
    processor.save_pretrained(run_dir)
    torch.manual_seed(0)
    model = DeepseekForImageClassification(VisionConfig(image_size=16, widths=[4, 8], blocks=1)).eval()
    repo = _example("serving").build_repository(run_dir, backend="torch", model=model)
    (repo / "linear" / "1").mkdir(parents=True)  # a model without preprocess: BYTES is refused
    (repo / "linear" / "config.yaml").write_text(linear_config())
    torch.jit.script(torch.nn.Linear(32, 10).eval()).save(str(repo / "linear" / "1" / "model.pt"))
    images = _example("data").load(run_dir)["x_test"]
    with torch.no_grad():
        reference = model(processor(list(images))).numpy()
    with Server(str(repo), port=0, grpc_port=0, torch_threads=1, max_request_mb=MAX_REQUEST_MB) as running:
        yield running, run_dir, images, reference


@pytest.fixture
def stub(served):
    with grpc.insecure_channel(served[0].grpc_target) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def test_tritonclient_grpc_png_bytes_match_http_and_the_model(served):
    running, run_dir, images, reference = served
    client = _example("client")
    pngs = [encode_png(image) for image in images[:4]]
    over_grpc = client.logits(running.grpc_target, pngs, protocol="grpc")
    np.testing.assert_allclose(over_grpc, reference[:4], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(over_grpc, client.logits(f"127.0.0.1:{running.port}", pngs))
    meta = grpcclient.InferenceServerClient(running.grpc_target).get_model_metadata("digits", as_json=True)
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": ["-1", "1"]}]
    # the example's command line, one image per request
    result = client.main(["--protocol", "grpc", "--url", running.grpc_target, "--run-dir", str(run_dir), "-n", "6"])
    labels = _example("data").load(run_dir)["y_test"][:6]
    assert result["n"] == 6 and result["accuracy"] == float(np.mean(reference[:6].argmax(-1) == labels))


def test_typed_bytes_contents(served, stub):
    running, _, images, reference = served
    request = service_pb2.ModelInferRequest(model_name="digits", id="typed")
    request.inputs.add(name="image", datatype="BYTES", shape=[2, 1]).contents.bytes_contents.extend(
        [encode_png(image) for image in images[:2]])
    response = stub.ModelInfer(request)
    assert response.outputs[0].name == "logits" and list(response.outputs[0].shape) == [2, 10]
    logits = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(2, 10)
    np.testing.assert_allclose(logits, reference[:2], rtol=1e-4, atol=1e-4)
    streamed = list(stub.ModelStreamInfer(iter([request])))  # the stream takes the same inputs
    assert len(streamed) == 1 and not streamed[0].error_message
    np.testing.assert_array_equal(np.frombuffer(streamed[0].infer_response.raw_output_contents[0], np.float32),
                                  logits.ravel())


def _raw(model: str, blob: bytes, shape=(1, 1)) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="image" if model == "digits" else "x", datatype="BYTES", shape=list(shape))
    request.raw_input_contents.append(blob)
    return request


def test_malformed_bytes_are_invalid_argument_and_the_server_goes_on(served, stub):
    running, _, images, reference = served
    png = encode_png(images[0])
    typed_count = service_pb2.ModelInferRequest(model_name="digits")
    typed_count.inputs.add(name="image", datatype="BYTES", shape=[2, 1]).contents.bytes_contents.append(png)
    wrong_field = service_pb2.ModelInferRequest(model_name="digits")
    wrong_field.inputs.add(name="image", datatype="BYTES", shape=[1, 1]).contents.fp32_contents.append(1.0)
    cases = [
        (_raw("digits", (len(png) + 5).to_bytes(4, "little") + png), "runs past the binary data"),
        (_raw("digits", _serialized([png]) + b"!"), "1 bytes of BYTES binary data left after 1 elements"),
        (_raw("digits", _serialized([png]), shape=(2, 1)), "ends inside an element's 4-byte length"),
        (typed_count, "shape [2, 1] needs 2 elements, data has 1"),
        (wrong_field, "a BYTES input takes contents.bytes_contents, got fp32_contents"),
        (_raw("digits", _serialized([b"\x89PNG\r\n\x1a\nthis is not a png"])), "not a readable PNG/JPEG"),
        (_raw("linear", _serialized([png])), "got BYTES (a model takes encoded images only through config.yaml's"),
    ]
    for request, message in cases:
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        assert message in caught.value.details()
    too_big = _raw("digits", _serialized([png + bytes(int(MAX_REQUEST_MB * 2**20))]))
    with pytest.raises(grpc.RpcError) as caught:  # the server's request size limit holds for BYTES too
        stub.ModelInfer(too_big)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(InferenceServerException, match="not a readable PNG/JPEG") as caught:  # tritonclient's view
        _example("client").logits(running.grpc_target, [b"GIF89a"], protocol="grpc")
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    logits = _example("client").logits(running.grpc_target, [png], protocol="grpc")
    np.testing.assert_allclose(logits, reference[:1], rtol=1e-4, atol=1e-4)


def test_parse_inputs_gives_the_object_array_http_gives():
    from deepseek.serve.protocols.kserve_tensors import parse_inputs as parse_http

    blob = _serialized([b"ab", b"", b"xyz"])
    request = _raw("digits", blob, shape=(3, 1))
    over_http = parse_http({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3, 1],
                                        "parameters": {"binary_data_size": len(blob)}}]}, blob)["image"]
    over_grpc = parse_inputs(request)["image"]
    assert over_grpc.dtype == object and over_grpc.shape == (3, 1)
    np.testing.assert_array_equal(over_grpc, over_http)
    empty = _raw("digits", b"", shape=(0, 1))
    assert parse_inputs(empty)["image"].shape == (0, 1)
