"""The KServe v2 HTTP front end, served by a real uvicorn server and driven by tritonclient and httpx."""

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import deepseek as ds

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from deepseek.serve.manager import ModelManager  # noqa: E402
from deepseek.serve.protocols.http_v2 import create_app  # noqa: E402
from deepseek.serve.repository import ModelRepository  # noqa: E402

from .gated_model import (GATE, gated_linear_config, linear_config, reference_linear, running_server,  # noqa: E402
                          wait_for, write_model)

LINEAR_CONFIG = linear_config()
MAX_BYTES = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 10).eval()
    (root / "linear" / "1").mkdir(parents=True)
    (root / "linear" / "config.yaml").write_text(LINEAR_CONFIG)
    torch.jit.script(linear).save(str(root / "linear" / "1" / "model.pt"))
    tiny = ds.MoETransformer(ds.preset("tiny")).eval()
    ds.save(tiny, ds.byte_tokenizer(), root / "tiny" / "1")
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "config.yaml").write_text("backend: torch\nmax_batch_size: -3\n")

    manager = ModelManager(ModelRepository(root))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(manager, max_request_bytes=MAX_BYTES), host="127.0.0.1",
                                           port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield {"url": f"127.0.0.1:{port}", "base": f"http://127.0.0.1:{port}", "manager": manager,
               "linear": linear, "tiny": tiny}
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert manager.closing and not manager._models  # the lifespan drained and closed everything


@pytest.fixture
def client(served):
    c = httpclient.InferenceServerClient(served["url"])
    yield c
    c.close()


@pytest.fixture
def http(served):
    with httpx.Client(base_url=served["base"], timeout=30) as c:
        yield c


def test_health_and_metadata_with_tritonclient(served, client, http):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("linear") and client.is_model_ready("linear", "1")
    assert client.is_model_ready("tiny")
    assert not client.is_model_ready("broken")
    meta = client.get_model_metadata("linear")
    assert meta["name"] == "linear" and meta["versions"] == ["1"] and meta["platform"] == "pytorch_torchscript"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 32]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 10]}]
    server = client.get_server_metadata()
    assert server["name"] == "deepseek" and "binary_tensor_data" in server["extensions"] and server["version"]
    assert http.get("/v2/models/linear/versions/1").json()["versions"] == ["1"]


@pytest.mark.parametrize("binary", [True, False])
def test_infer_with_tritonclient_matches_eager(served, client, binary):
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    result = client.infer("linear", [inp], outputs=[httpclient.InferRequestedOutput("y", binary_data=binary)],
                          request_id="req-7")
    with torch.inference_mode():
        expected = served["linear"](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(result.as_numpy("y"), expected, rtol=1e-5, atol=1e-6)
    response = result.get_response()
    assert response["id"] == "req-7" and response["model_name"] == "linear" and response["model_version"] == "1"
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.infer("nope", [inp])


def test_infer_json_nested_data_and_output_selection(served, http):
    x = torch.randn(2, 32)
    body = {"id": "a", "inputs": [{"name": "x", "shape": [2, 32], "datatype": "FP32", "data": x.tolist()}],
            "outputs": [{"name": "y"}]}
    r = http.post("/v2/models/linear/versions/1/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == "a" and out["outputs"][0]["shape"] == [2, 10] and out["outputs"][0]["datatype"] == "FP32"
    with torch.inference_mode():
        expected = served["linear"](x)
    torch.testing.assert_close(torch.tensor(out["outputs"][0]["data"]).reshape(2, 10), expected)


def _good(x=None):
    x = torch.zeros(1, 32) if x is None else x
    return {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.flatten().tolist()}]}


def test_errors_keep_the_server_serving(served, http):
    def error(r, status):
        assert r.status_code == status, r.text
        assert isinstance(r.json()["error"], str) and r.json()["error"]

    error(http.post("/v2/models/linear/infer", content=b"{not json"), 400)
    assert http.post("/v2/models/linear/infer", json=_good()).status_code == 200
    bad_len = _good()
    bad_len["inputs"][0]["shape"] = [2, 32]
    error(http.post("/v2/models/linear/infer", json=bad_len), 400)
    bad_type = _good()
    bad_type["inputs"][0]["datatype"] = "FP33"
    error(http.post("/v2/models/linear/infer", json=bad_type), 400)
    wrong_shape = _good(torch.zeros(1, 31))
    error(http.post("/v2/models/linear/infer", json=wrong_shape), 400)  # the backend's ValueError
    error(http.post("/v2/models/linear/infer", json={"inputs": []}), 400)
    error(http.post("/v2/models/linear/infer", json={**_good(), "outputs": [{"name": "z"}]}), 400)
    error(http.post("/v2/models/nope/infer", json=_good()), 404)
    error(http.get("/v2/models/nope"), 404)
    error(http.get("/v2/models/linear/versions/9/ready"), 404)
    error(http.get("/v2/models/broken/ready"), 503)
    error(http.post("/v2/models/broken/infer", json=_good()), 503)
    error(http.post("/v2/models/linear/infer", content=b"{" + b" " * (MAX_BYTES + 1) + b"}"), 413)
    # A chunked body (no Content-Length) over the limit is caught while reading.
    error(http.post("/v2/models/linear/infer", content=iter([b"{", b" " * MAX_BYTES, b"}"])), 413)
    assert http.post("/v2/models/linear/infer", json=_good()).status_code == 200
    assert http.get("/v2/health/ready").status_code == 200


def test_repository_index_reports_live_states(served, http):
    rows = {r["name"]: r for r in http.post("/v2/repository/index").json()}
    assert rows["linear"]["state"] == "READY" and rows["linear"]["version"] == "1"
    assert rows["tiny"]["state"] == "READY"
    assert rows["broken"]["state"] == "UNAVAILABLE" and "max_batch_size" in rows["broken"]["reason"]
    ready = http.post("/v2/repository/index", json={"ready": True}).json()
    assert {r["name"] for r in ready} == {"linear", "tiny"}


def test_concurrent_requests_are_batched(tmp_path):
    """The first request holds the model (a gated Linear) until all 32 are queued: the rest then batch."""
    write_model(tmp_path, "held-linear", config=gated_linear_config())
    manager = ModelManager(ModelRepository(tmp_path))
    GATE.reset()
    with running_server(manager) as base:
        _concurrent_requests_are_batched(manager, base.removeprefix("http://"))


def _concurrent_requests_are_batched(manager, url):
    batcher = manager.get("held-linear").batcher
    stats = batcher.stats
    before_requests, before_batches = stats.requests, stats.batches
    xs = [np.random.default_rng(i).standard_normal((1, 32)).astype(np.float32) for i in range(32)]

    def call(x):
        c = httpclient.InferenceServerClient(url)
        try:
            inp = httpclient.InferInput("x", [1, 32], "FP32")
            inp.set_data_from_numpy(x)
            return c.infer("held-linear", [inp]).as_numpy("y")
        finally:
            c.close()

    GATE.reset()
    GATE.close()
    try:
        with ThreadPoolExecutor(32) as pool:
            futures = [pool.submit(call, x) for x in xs]
            # the held batch may have taken more than one request if several arrived at once
            wait_for(lambda: GATE.calls == 1 and len(GATE.values()[0]) + batcher.queue_size == 32,
                     "every request to queue behind the held one")
            GATE.open()
            results = [f.result() for f in futures]
    finally:
        GATE.reset()
    linear = reference_linear()
    with torch.inference_mode():
        for x, y in zip(xs, results):
            np.testing.assert_allclose(y, linear(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6)
    assert stats.requests - before_requests == 32
    assert stats.batches - before_batches < 32


def test_deepseek_model_logits(served, client):
    ids = np.random.default_rng(0).integers(0, 256, (2, 7)).astype(np.int64)
    inp = httpclient.InferInput("input_ids", list(ids.shape), "INT64")
    inp.set_data_from_numpy(ids)
    logits = client.infer("tiny", [inp]).as_numpy("logits")
    with torch.inference_mode():
        expected = served["tiny"](torch.from_numpy(ids)).float().numpy()
    assert logits.shape == expected.shape
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
    meta = client.get_model_metadata("tiny")
    assert meta["platform"] == "deepseek" and meta["inputs"][0]["name"] == "input_ids"


def test_manager_reload_unload_and_load_failure(tmp_path):
    import asyncio

    from deepseek.serve.manager import ModelNotFoundError, ModelUnavailableError

    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "config.yaml").write_text(LINEAR_CONFIG)  # no model.pt: the load fails
    linear = torch.nn.Linear(32, 10).eval()

    async def main():
        manager = ModelManager(ModelRepository(tmp_path))
        await manager.load_all()
        assert manager.index()[0]["state"] == "UNAVAILABLE" and "model.pt" in manager.index()[0]["reason"]
        with pytest.raises(ModelUnavailableError):
            manager.get("m")
        torch.jit.script(linear).save(str(tmp_path / "m" / "1" / "model.pt"))
        await manager.load("m")
        first = manager.get("m")
        x = torch.randn(2, 32)
        pending = asyncio.ensure_future(manager.infer("m", None, {"x": x}))
        await asyncio.sleep(0)  # queued in the old batcher
        (tmp_path / "m" / "1" / "model.pt").unlink()
        await manager.load("m")  # the reload fails: the loaded version keeps serving
        assert manager.get("m") is first and first.ready
        torch.jit.script(linear).save(str(tmp_path / "m" / "1" / "model.pt"))
        await manager.load("m")  # a good reload swaps in a new copy; the old one drains
        assert manager.get("m") is not first and not first.ready
        with torch.inference_mode():
            torch.testing.assert_close((await pending)["y"], linear(x))
        await manager.unload("m")
        with pytest.raises(ModelNotFoundError):
            manager.get("m")
        await manager.close()

    asyncio.run(main())
