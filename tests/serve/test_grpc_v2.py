"""The KServe v2 / Triton gRPC service, served by a real grpc.aio server and driven by tritonclient.grpc."""

import asyncio
import io
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import deepseek as ds

grpc = pytest.importorskip("grpc")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from deepseek.serve.manager import ModelManager  # noqa: E402
from deepseek.serve.metrics import ServingMetrics  # noqa: E402
from deepseek.serve.protocols.common import AccessLog  # noqa: E402
from deepseek.serve.protocols.grpc_v2 import create_grpc_server  # noqa: E402
from deepseek.serve.repository import ModelRepository  # noqa: E402

from .gated_model import linear_config  # noqa: E402

LINEAR_CONFIG = linear_config()
AB_CONFIG = LINEAR_CONFIG + "version_policy: {all: true}\nrouting: {policy: ab, control_ratio: 0.5}\n"
# One request runs at a time (held by the gate), two more may wait, a fourth is turned away.
GATE_CONFIG = """\
backend: torch
max_batch_size: 1
parameters: {entry_point: "grpc_v2_test_models:gate"}
inputs: [{name: x, datatype: FP32, shape: [4]}]
outputs: [{name: y, datatype: FP32, shape: [4]}]
dynamic_batching: {max_queue_delay_ms: 0, max_queue_size: 2}
"""
BOOM_CONFIG = """\
backend: torch
parameters: {entry_point: "grpc_v2_test_models:boom"}
inputs: [{name: x, datatype: FP32, shape: [4]}]
outputs: [{name: y, datatype: FP32, shape: [4]}]
"""
TEST_MODELS = '''\
import threading

import torch

entered = threading.Event()  # set by each call of the gate model once it runs
release = threading.Event()  # the gate model returns only once this is set
calls = []  # rows of each call


class Gate(torch.nn.Module):
    def forward(self, x):
        calls.append(x.shape[0])
        entered.set()
        if not release.wait(30):
            raise RuntimeError("the test never released the gate")
        return x * 2


class Boom(torch.nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def gate():
    return Gate()


def boom():
    return Boom()
'''
KEY = "k"


def _status(exc_info) -> str:
    return exc_info.value.status()


class Served:
    """A ModelManager and its gRPC server on their own event loop in a background thread."""

    def __init__(self, root, **server_kwargs):
        self.root, self.control_mode = root, server_kwargs.pop("control_mode", "explicit")
        self.server_kwargs = server_kwargs
        self.started = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.thread.start()
        assert self.started.wait(60), "the gRPC server did not start"
        if self.error is not None:
            raise self.error
        self.url = f"127.0.0.1:{self.port}"

    async def _main(self):
        try:
            self.loop = asyncio.get_running_loop()
            self.manager = ModelManager(ModelRepository(self.root), control_mode=self.control_mode)
            self.manager.metrics = ServingMetrics(self.manager)
            await self.manager.load_all()
            server, self.port = create_grpc_server(self.manager, port=0, **self.server_kwargs)
            await server.start()
            self._stop = asyncio.Event()
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self.started.set()
        await self._stop.wait()
        await server.stop(grace=5)
        await self.manager.close()

    def read(self, fn):
        """``fn()`` evaluated on the server's loop (its state belongs to that thread)."""
        async def call():
            return fn()
        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(10)

    def wait_until(self, fn, what: str, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while not self.read(fn):
            assert time.monotonic() < deadline, f"timed out waiting until {what}"
            time.sleep(0.005)

    def stop(self):
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()
        assert self.manager.closing and not self.manager._models


def _save_linear(path, seed):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(32, 10).eval()
    path.mkdir(parents=True)
    torch.jit.script(linear).save(str(path / "model.pt"))
    return linear


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The test models' module (gate events, call log), importable by the torch backend's entry points."""
    folder = tmp_path_factory.mktemp("pymodels")
    (folder / "grpc_v2_test_models.py").write_text(TEST_MODELS)
    sys.path.insert(0, str(folder))
    import grpc_v2_test_models
    yield grpc_v2_test_models
    grpc_v2_test_models.release.set()
    sys.path.remove(str(folder))
    sys.modules.pop("grpc_v2_test_models", None)


@pytest.fixture(scope="module")
def served(tmp_path_factory, models):
    root = tmp_path_factory.mktemp("repo")
    (root / "linear").mkdir()
    (root / "linear" / "config.yaml").write_text(LINEAR_CONFIG)
    linear = _save_linear(root / "linear" / "1", 0)
    (root / "ab").mkdir()
    (root / "ab" / "config.yaml").write_text(AB_CONFIG)
    ab = {1: _save_linear(root / "ab" / "1", 1), 2: _save_linear(root / "ab" / "2", 2)}
    tiny = ds.MoETransformer(ds.preset("tiny")).eval()
    ds.save(tiny, ds.byte_tokenizer(), root / "tiny" / "1")
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "config.yaml").write_text("backend: torch\nmax_batch_size: -3\n")
    for name, config in (("gate", GATE_CONFIG), ("boom", BOOM_CONFIG)):
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.yaml").write_text(config)
    server = Served(root, api_key=KEY, access_log=AccessLog(io.StringIO()))
    server.linear, server.ab, server.tiny = linear, ab, tiny
    try:
        yield server
    finally:
        models.release.set()  # a failed gate test must not block the drain
        server.stop()


@pytest.fixture
def client(served):
    with grpcclient.InferenceServerClient(served.url) as c:
        yield c


@pytest.fixture
def stub(served):
    with grpc.insecure_channel(served.url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _input(x: np.ndarray, name: str = "x", datatype: str = "FP32"):
    inp = grpcclient.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return inp


def _eager(module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return module(torch.from_numpy(x)).float().numpy()


# -- health, metadata, config, index ------------------------------------------------------------------------

def test_health_metadata_config_and_index(served, client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("linear") and client.is_model_ready("linear", "1")
    assert client.is_model_ready("tiny")
    assert not client.is_model_ready("broken") and not client.is_model_ready("nope")
    assert not client.is_model_ready("linear", "9")
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "deepseek" and server["version"] and "model_repository" in server["extensions"]
    meta = client.get_model_metadata("linear", as_json=True)
    assert meta["name"] == "linear" and meta["versions"] == ["1"] and meta["platform"] == "pytorch_torchscript"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "32"]}]  # int64 as JSON strings
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": ["-1", "10"]}]
    proto = client.get_model_metadata("tiny")
    assert proto.platform == "deepseek" and proto.inputs[0].name == "input_ids"
    assert list(proto.inputs[0].shape) == [-1, -1]
    config = client.get_model_config("linear").config
    assert config.name == "linear" and config.max_batch_size == 64 and config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == 5000
    assert [(i.name, list(i.dims)) for i in config.input] == [("x", [32])]
    rows = {r["name"]: r for r in client.get_model_repository_index(as_json=True)["models"]}
    assert rows["linear"]["state"] == "READY" and rows["linear"]["version"] == "1"
    assert rows["broken"]["state"] == "UNAVAILABLE" and "max_batch_size" in rows["broken"]["reason"]
    ready = service_pb2.RepositoryIndexRequest(ready=True)
    with grpc.insecure_channel(served.url) as channel:
        only_ready = service_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(ready)
    assert "broken" not in {m.name for m in only_ready.models} and "linear" in {m.name for m in only_ready.models}
    assert client.get_system_shared_memory_status(as_json=True) == {}
    with pytest.raises(OSError, match="cannot bind"):  # a taken port is an error, not a second listener
        served.read(lambda: create_grpc_server(served.manager, port=served.port))
    with pytest.raises(InferenceServerException) as e:
        client.get_trace_settings()
    assert _status(e) == "StatusCode.UNIMPLEMENTED"


# -- inference --------------------------------------------------------------------------------------------------

def test_infer_matches_eager_and_selects_outputs(served, client):
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    result = client.infer("linear", [_input(x)], outputs=[grpcclient.InferRequestedOutput("y")], request_id="r-7")
    np.testing.assert_allclose(result.as_numpy("y"), _eager(served.linear, x), rtol=1e-5, atol=1e-5)
    response = result.get_response()
    assert (response.id, response.model_name, response.model_version) == ("r-7", "linear", "1")
    assert [o.name for o in response.outputs] == ["y"] and list(response.outputs[0].shape) == [3, 10]
    assert "routing_variant" not in response.parameters
    lines = [json.loads(line) for line in served.server_kwargs["access_log"]._stream.getvalue().splitlines()]
    entry = next(e for e in lines if e["id"] == "r-7")
    assert entry["protocol"] == "grpc" and entry["status"] == "OK" and entry["model"] == "linear"
    assert entry["version"] == 1 and entry["batch_size"] == 3
    assert entry["route"] == "grpc/infer" and entry["client"].startswith("ipv")  # the peer, without its port

    ids = np.random.default_rng(1).integers(0, 256, (2, 7)).astype(np.int64)
    logits = client.infer("tiny", [_input(ids, "input_ids", "INT64")], model_version="1").as_numpy("logits")
    expected = _eager(served.tiny, ids)
    assert logits.shape == expected.shape
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_typed_contents_and_raw_size_checks(served, stub):
    x = np.random.default_rng(2).standard_normal((2, 32)).astype(np.float32)
    request = service_pb2.ModelInferRequest(model_name="linear", id="typed")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[2, 32])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    response = stub.ModelInfer(request)
    y = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(2, 10)
    np.testing.assert_allclose(y, _eager(served.linear, x), rtol=1e-5, atol=1e-5)

    def invalid(request, match):
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(request)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert match in e.value.details()

    short = service_pb2.ModelInferRequest(model_name="linear")
    short.inputs.add(name="x", datatype="FP32", shape=[2, 32])
    short.raw_input_contents.append(x.tobytes()[:-4])
    invalid(short, "252 bytes of raw_input_contents do not fit shape [2, 32] of FP32 (256 bytes)")
    mixed = service_pb2.ModelInferRequest()
    mixed.CopyFrom(request)
    mixed.raw_input_contents.append(x.tobytes())
    invalid(mixed, "cannot be mixed")
    count = service_pb2.ModelInferRequest(model_name="linear")
    count.inputs.add(name="x", datatype="FP32", shape=[2, 32])
    count.raw_input_contents.extend([x.tobytes(), x.tobytes()])
    invalid(count, "2 raw_input_contents for 1 inputs")
    wrong_field = service_pb2.ModelInferRequest(model_name="linear")
    wrong_field.inputs.add(name="x", datatype="FP32", shape=[1, 1]).contents.int64_contents.append(3)
    invalid(wrong_field, "takes contents.fp32_contents")
    half = service_pb2.ModelInferRequest(model_name="linear")
    half.inputs.add(name="x", datatype="FP16", shape=[1]).contents.fp32_contents.append(1.0)
    invalid(half, "must be sent in raw_input_contents")
    empty = service_pb2.ModelInferRequest(model_name="linear")
    empty.inputs.add(name="x", datatype="FP32", shape=[1, 32])
    invalid(empty, "has no data")
    bad_timeout = service_pb2.ModelInferRequest()
    bad_timeout.CopyFrom(request)
    bad_timeout.parameters["timeout"].string_param = "soon"
    invalid(bad_timeout, "timeout")


@pytest.mark.parametrize("datatype", ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
                                      "INT64", "FP16", "FP32", "FP64", "BF16"])
def test_parse_inputs_raw_and_typed_for_every_datatype(datatype):
    from deepseek.serve.config import DATATYPE_TO_TORCH
    from deepseek.serve.protocols.grpc_v2 import _CONTENTS_FIELD, parse_inputs
    from deepseek.serve.protocols.common import tensor_bytes as _tensor_bytes

    dtype = DATATYPE_TO_TORCH[datatype]
    values = torch.tensor([[0, 1, 2], [3, 100, 7]]).to(dtype)
    raw = service_pb2.ModelInferRequest()
    raw.inputs.add(name="t", datatype=datatype, shape=[2, 3])
    raw.raw_input_contents.append(_tensor_bytes(values))
    parsed = parse_inputs(raw)["t"]
    assert parsed.dtype == dtype and torch.equal(parsed, values)
    if datatype in _CONTENTS_FIELD:
        typed = service_pb2.ModelInferRequest()
        t = typed.inputs.add(name="t", datatype=datatype, shape=[2, 3])
        getattr(t.contents, _CONTENTS_FIELD[datatype]).extend(values.flatten().tolist())
        assert torch.equal(parse_inputs(typed)["t"], values)
    if datatype == "BOOL":  # any non-zero byte is true
        raw.raw_input_contents[0] = bytes([0, 2, 255, 1, 0, 0])
        assert parse_inputs(raw)["t"].tolist() == [[False, True, True], [True, False, False]]
    if datatype == "INT8":
        typed.inputs[0].contents.int_contents[0] = 300
        with pytest.raises(ValueError, match="do not fit INT8"):
            parse_inputs(typed)


def test_concurrent_infers_are_batched(served, client):
    before = client.get_inference_statistics("linear").model_stats[0]
    xs = [np.random.default_rng(i).standard_normal((1, 32)).astype(np.float32) for i in range(64)]
    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(lambda x: client.infer("linear", [_input(x)]).as_numpy("y"), xs))
    for x, y in zip(xs, results):
        np.testing.assert_allclose(y, _eager(served.linear, x), rtol=1e-5, atol=1e-5)
    stats = client.get_inference_statistics("linear", "1", as_json=True)["model_stats"][0]
    assert int(stats["inference_count"]) - before.inference_count == 64
    executions = int(stats["execution_count"]) - before.execution_count
    assert 0 < executions < 64
    assert max(int(b["batch_size"]) for b in stats["batch_stats"]) > 1
    assert int(stats["inference_stats"]["success"]["count"]) >= 64
    assert {s.name for s in client.get_inference_statistics().model_stats} >= {"linear", "tiny"}


def test_stream_answers_match_by_id_and_survive_errors(served, client):
    answers, done = {}, threading.Event()
    xs = {f"s{i}": np.random.default_rng(10 + i).standard_normal((1 + i % 3, 32)).astype(np.float32)
          for i in range(8)}

    def callback(result, error):
        if error is not None:
            answers[str(error).split("]")[0]] = error
        else:
            answers[result.get_response().id] = result
        if len(answers) == len(xs) + 2:
            done.set()

    client.start_stream(callback=callback)
    try:
        for i, (rid, x) in enumerate(xs.items()):
            client.async_stream_infer("linear", [_input(x)], request_id=rid)
            if i == 2:  # errors in the middle do not end the stream
                client.async_stream_infer("nope", [_input(x)], request_id="bad-model")
                client.async_stream_infer("linear", [_input(x[:, :31])], request_id="bad-shape")
        assert done.wait(30), f"only {sorted(answers)} answered"
    finally:
        client.stop_stream()
    for rid, x in xs.items():
        np.testing.assert_allclose(answers[rid].as_numpy("y"), _eager(served.linear, x), rtol=1e-5, atol=1e-5)
    assert "unknown model 'nope'" in str(answers["[request id: bad-model"])
    assert "shape [3, 31] does not match" in str(answers["[request id: bad-shape"])


def test_ab_routing_variant_in_response_parameters(served, client):
    policy = served.manager.router.policy("ab")
    assert client.is_model_ready("ab") and client.get_model_metadata("ab").versions == ["1", "2"]
    client.get_model_config("ab")
    # Readiness, metadata and config lookups are not requests of the experiment.
    assert sum(v["requests"] for v in served.read(policy.report)["variants"].values()) == 0
    x = np.random.default_rng(3).standard_normal((2, 32)).astype(np.float32)
    variants = set()
    for user in ("alice", "bob", "carol", "dave", "erin", "frank"):
        first = client.infer("ab", [_input(x)], parameters={"routing_key": user})
        again = client.infer("ab", [_input(x)], parameters={"routing_key": user})
        response = first.get_response()
        variant = response.parameters["routing_variant"].string_param
        assert variant == policy.assign(user) == again.get_response().parameters["routing_variant"].string_param
        version = int(response.model_version)
        assert version == {"control": 1, "treatment": 2}[variant]
        np.testing.assert_allclose(first.as_numpy("y"), _eager(served.ab[version], x), rtol=1e-5, atol=1e-5)
        variants.add(variant)
    assert variants == {"control", "treatment"}
    # The x-user-id metadata is a routing key too.
    by_header = client.infer("ab", [_input(x)], headers={"x-user-id": "alice"}).get_response()
    assert by_header.parameters["routing_variant"].string_param == policy.assign("alice")


# -- errors ---------------------------------------------------------------------------------------------------

def _refused(served) -> dict:
    """``ds_inference_refused_total`` by gRPC code, from the server's metrics."""
    families = text_string_to_metric_families(served.manager.metrics.render().decode())
    return {s.labels["status"]: s.value for f in families if f.name == "ds_inference_refused"
            for s in f.samples if s.name == "ds_inference_refused_total"}


def test_errors_keep_the_server_serving(served, client):
    x = np.zeros((1, 32), np.float32)
    refused_before = _refused(served)

    def fails(status, call, match=None):
        with pytest.raises(InferenceServerException) as e:
            call()
        assert _status(e) == f"StatusCode.{status}", str(e.value)
        if match:
            assert match in e.value.message()

    fails("NOT_FOUND", lambda: client.infer("nope", [_input(x)]), "unknown model 'nope'")
    fails("NOT_FOUND", lambda: client.infer("linear", [_input(x)], model_version="9"))
    fails("NOT_FOUND", lambda: client.get_model_metadata("nope"))
    fails("NOT_FOUND", lambda: client.get_inference_statistics("nope"))
    fails("UNAVAILABLE", lambda: client.infer("broken", [_input(x)]))
    fails("UNAVAILABLE", lambda: client.get_model_config("broken"))
    fails("INVALID_ARGUMENT", lambda: client.infer("linear", [_input(x.astype(np.float64), "x", "FP64")]),
          "datatype must be FP32")
    fails("INVALID_ARGUMENT", lambda: client.infer("linear", [_input(np.zeros((1, 31), np.float32))]),
          "shape [1, 31] does not match")
    fails("INVALID_ARGUMENT", lambda: client.infer("linear", [_input(x)],
                                                   outputs=[grpcclient.InferRequestedOutput("z")]), "unknown output")
    fails("INVALID_ARGUMENT", lambda: client.infer("linear", [_input(x)], model_version="v1"))
    fails("INVALID_ARGUMENT", lambda: client.infer("tiny", [_input(np.full((1, 3), 999, np.int64),
                                                                   "input_ids", "INT64")]), "must lie in")
    fails("INTERNAL", lambda: client.infer("boom", [_input(np.zeros(4, np.float32))]), "model 'boom' failed: boom")
    refused = _refused(served)
    # Refused before any model: unknown model/version, not ready, unknown output, malformed version; the bad
    # dtype/shape/token ids reached their model and are counted there (outcome "invalid").
    assert {code: refused[code] - refused_before.get(code, 0) for code in refused} == \
        {"NOT_FOUND": 2, "UNAVAILABLE": 1, "INVALID_ARGUMENT": 2}
    assert client.is_server_ready()
    np.testing.assert_allclose(client.infer("linear", [_input(x)]).as_numpy("y"), _eager(served.linear, x),
                               rtol=1e-5, atol=1e-5)


# -- queue limits, deadlines and cancellation (a gate model held by the test) ---------------------------------

@pytest.fixture
def gate(served, models):
    """The gate model closed, its queue empty; it is opened again and drained at the end."""
    mv = served.manager.get("gate", 1)
    served.wait_until(lambda: mv.batcher.queue_size == 0 and mv.batcher.busy == 0, "the gate model is idle")
    models.release.clear()
    models.entered.clear()
    yield mv
    models.release.set()
    served.wait_until(lambda: mv.batcher.queue_size == 0 and mv.batcher.busy == 0, "the gate model is idle")


def _collect(answers, name):
    done = threading.Event()

    def callback(result, error):
        answers[name] = error if error is not None else result
        done.set()
    return callback, done


def _start_blocking_request(client, models, answers):
    """A request that holds the gate model's only instance until the gate is released."""
    callback, done = _collect(answers, "running")
    client.async_infer("gate", [_input(np.ones((1, 4), np.float32))], callback=callback)
    assert models.entered.wait(10), "the gate model never started"
    return done


def test_queue_full_is_resource_exhausted(served, client, models, gate):
    answers = {}
    running = _start_blocking_request(client, models, answers)
    waiting = []
    for name in ("q1", "q2"):
        callback, done = _collect(answers, name)
        client.async_infer("gate", [_input(np.full((1, 4), 3, np.float32))], callback=callback)
        waiting.append(done)
    served.wait_until(lambda: gate.batcher.queue_size == 2, "two requests wait")
    with pytest.raises(InferenceServerException) as e:
        client.infer("gate", [_input(np.ones((1, 4), np.float32))])
    assert _status(e) == "StatusCode.RESOURCE_EXHAUSTED" and "queue full" in e.value.message()
    models.release.set()
    assert running.wait(10) and all(d.wait(10) for d in waiting)
    np.testing.assert_array_equal(answers["running"].as_numpy("y"), np.full((1, 4), 2, np.float32))
    for name in ("q1", "q2"):
        np.testing.assert_array_equal(answers[name].as_numpy("y"), np.full((1, 4), 6, np.float32))


def test_timeouts_are_deadline_exceeded_and_never_computed(served, client, models, gate):
    answers = {}
    running = _start_blocking_request(client, models, answers)
    calls, failed = len(models.calls), gate.stats.durations["fail"].count
    x = [_input(np.ones((1, 4), np.float32))]
    with pytest.raises(InferenceServerException) as e:
        client.infer("gate", x, timeout=50_000)  # Triton's per-request `timeout` parameter, in µs
    assert _status(e) == "StatusCode.DEADLINE_EXCEEDED"
    with pytest.raises(InferenceServerException) as e:
        client.infer("gate", x, client_timeout=0.1)  # the gRPC deadline
    assert _status(e) == "StatusCode.DEADLINE_EXCEEDED"
    models.release.set()
    assert running.wait(10) and isinstance(answers["running"], grpcclient.InferResult)
    served.wait_until(lambda: gate.batcher.queue_size == 0 and gate.batcher.busy == 0, "the gate model is idle")
    assert len(models.calls) == calls  # the expired requests were dropped, not computed
    assert gate.stats.durations["fail"].count == failed + 2


def test_client_cancel_drops_the_queued_request(served, client, models, gate):
    answers = {}
    running = _start_blocking_request(client, models, answers)
    dropped, failed = gate.batcher.stats.dropped, gate.stats.durations["fail"].count
    calls = len(models.calls)
    callback, cancelled = _collect(answers, "cancelled")
    call = client.async_infer("gate", [_input(np.ones((1, 4), np.float32))], callback=callback)
    served.wait_until(lambda: gate.batcher.queue_size == 1, "the request waits")
    call.cancel()
    assert cancelled.wait(10) and "CANCELLED" in answers["cancelled"].status()
    # The server's handler was cancelled too: manager.run recorded the request as failed.
    served.wait_until(lambda: gate.stats.durations["fail"].count == failed + 1, "the server sees the cancel")
    models.release.set()
    assert running.wait(10)
    served.wait_until(lambda: gate.batcher.queue_size == 0 and gate.batcher.busy == 0, "the gate model is idle")
    assert len(models.calls) == calls  # only the running request was computed
    assert gate.batcher.stats.dropped == dropped + 1


def test_cancelled_stream_drops_its_queued_requests(served, client, models, gate):
    dropped, failed = gate.batcher.stats.dropped, gate.stats.durations["fail"].count
    client.start_stream(callback=lambda result, error: None)
    try:
        client.async_stream_infer("gate", [_input(np.ones((1, 4), np.float32))], request_id="running")
        assert models.entered.wait(10), "the gate model never started"
        calls = len(models.calls)
        client.async_stream_infer("gate", [_input(np.ones((1, 4), np.float32))], request_id="queued")
        served.wait_until(lambda: gate.batcher.queue_size == 1, "the second request waits")
    finally:
        client.stop_stream(cancel_requests=True)
    # Both of the stream's requests are abandoned: the running one's answer is discarded, the queued one dropped.
    served.wait_until(lambda: gate.stats.durations["fail"].count == failed + 2, "the server sees the cancel")
    models.release.set()
    served.wait_until(lambda: gate.batcher.queue_size == 0 and gate.batcher.busy == 0, "the gate model is idle")
    assert len(models.calls) == calls and gate.batcher.stats.dropped == dropped + 1
    assert client.infer("gate", [_input(np.ones((1, 4), np.float32))]).as_numpy("y")[0, 0] == 2


# -- management and access control ---------------------------------------------------------------------------

def test_load_unload_need_the_key(served, client):
    for call in (lambda h: client.unload_model("linear", headers=h), lambda h: client.load_model("linear", headers=h)):
        for headers in (None, {"authorization": "Bearer wrong"}, {"x-api-key": "wrong"}):
            with pytest.raises(InferenceServerException) as e:
                call(headers)
            assert _status(e) == "StatusCode.UNAUTHENTICATED"
    assert client.is_model_ready("linear")
    client.unload_model("linear", headers={"authorization": f"Bearer {KEY}"})
    assert not client.is_model_ready("linear")
    client.load_model("linear", headers={"x-api-key": KEY})
    assert client.is_model_ready("linear")
    with pytest.raises(InferenceServerException) as e:
        client.load_model("broken", headers={"x-api-key": KEY})
    assert _status(e) == "StatusCode.INVALID_ARGUMENT" and "max_batch_size" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.load_model("linear", headers={"x-api-key": KEY}, config='{"max_batch_size": 8}')
    assert _status(e) == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException) as e:
        client.unload_model("nope", headers={"x-api-key": KEY})
    assert _status(e) == "StatusCode.NOT_FOUND"
    x = np.ones((1, 32), np.float32)
    np.testing.assert_allclose(client.infer("linear", [_input(x)]).as_numpy("y"), _eager(served.linear, x),
                               rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    (root / "linear").mkdir()
    (root / "linear" / "config.yaml").write_text(LINEAR_CONFIG)
    _save_linear(root / "linear" / "1", 0)
    return root


def test_protected_inference_control_mode_and_message_limit(small_repo):
    server = Served(small_repo, control_mode="none", api_key="k2", protect_inference=True,
                    max_message_bytes=64 * 1024)
    try:
        with grpcclient.InferenceServerClient(server.url) as client:
            x = np.ones((2, 32), np.float32)
            with pytest.raises(InferenceServerException) as e:
                client.infer("linear", [_input(x)])
            assert _status(e) == "StatusCode.UNAUTHENTICATED"
            assert client.infer("linear", [_input(x)], headers={"authorization": "Bearer k2"}).as_numpy("y").shape \
                == (2, 10)
            assert client.is_model_ready("linear")  # health and metadata stay open
            with pytest.raises(InferenceServerException) as e:
                client.load_model("linear", headers={"x-api-key": "k2"})
            assert _status(e) == "StatusCode.FAILED_PRECONDITION" and "explicit" in e.value.message()
            big = np.ones((64, 32 * 16), np.float32)  # 128 KiB: over the 64 KiB message limit
            with pytest.raises(InferenceServerException) as e:
                client.infer("linear", [_input(big)], headers={"x-api-key": "k2"})
            assert _status(e) == "StatusCode.RESOURCE_EXHAUSTED"
    finally:
        server.stop()


def test_management_without_a_key_is_permission_denied(small_repo):
    server = Served(small_repo)
    try:
        with grpcclient.InferenceServerClient(server.url) as client:
            with pytest.raises(InferenceServerException) as e:
                client.unload_model("linear", headers={"x-api-key": "anything"})
            assert _status(e) == "StatusCode.PERMISSION_DENIED" and "--api-key" in e.value.message()
            assert client.is_model_ready("linear")
    finally:
        server.stop()
