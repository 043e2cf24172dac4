"""Property-based fuzzing of POST /v2/models/{m}/infer on a real server: whatever a client sends, the answer is
never a server error (5xx) — a malformed request is the client's fault (4xx) — and the server stays live.
The management JSON routes (routing policy, experiment outcomes) get the same treatment, with the API key.

Bodies range from plausible requests with one thing wrong (names, datatypes, shapes, data, parameters, binary
lengths) to JSON junk, non-JSON bytes and pathological nesting. The only 5xx allowed is 504 for a request that
set its own (tiny) ``timeout``.
"""

import json

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from deepseek.serve.config import DATATYPES  # noqa: E402
from deepseek.serve.manager import ModelManager  # noqa: E402
from deepseek.serve.repository import ModelRepository  # noqa: E402

from .gated_model import GATE, model_config, running_server, write_model  # noqa: E402

HEADER_LENGTH = "Inference-Header-Content-Length"
KEY = "fuzz-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    write_model(root, "m", config=model_config(max_batch_size=4, dynamic_batching={"max_queue_delay_ms": 0,
                                                                                   "priority_levels": 2}))
    write_model(root, "u", config=model_config(max_batch_size=0, shape=[2]))  # no batch dimension
    GATE.reset()
    with running_server(ModelManager(ModelRepository(root)), max_request_bytes=1 << 16, api_key=KEY) as base, \
            httpx.Client(base_url=base, timeout=60) as http:
        yield http
    GATE.reset()


# -- strategies ---------------------------------------------------------------------------------------------

big_ints = st.integers(min_value=-(10 ** 30), max_value=10 ** 30) | st.sampled_from([2 ** 63, -(2 ** 63) - 1, 2 ** 64,
                                                                                      10 ** 400])
numbers = st.integers(-3, 300) | big_ints | st.floats(allow_nan=True, allow_infinity=True)
leaves = st.none() | st.booleans() | numbers | st.text(max_size=6)
junk = st.recursive(leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                         max_size=3), max_leaves=8)
names = st.sampled_from(["x", "y", ""]) | junk
datatypes = st.sampled_from(list(DATATYPES) + ["FP33", "fp32", ""]) | junk
shapes = st.lists(st.integers(-1, 3), max_size=4) | st.lists(big_ints, max_size=3) | junk
data = st.recursive(numbers | st.booleans(), lambda inner: st.lists(inner, max_size=4), max_leaves=10) | junk
extremes = st.sampled_from([0, -1, 1, 2 ** 63, 10 ** 400, 1e-300, 1e308, float("nan"), float("inf"), True, "1"])
parameter_values = {
    "timeout": extremes | numbers | junk,
    "priority": extremes | numbers | junk,
    "routing_key": st.text(max_size=5) | junk,
    "binary_data_output": junk,
    "binary_data": junk,
    "binary_data_size": numbers | junk,
}
parameters = st.fixed_dictionaries({}, optional=parameter_values) | junk


@st.composite
def plausible(draw) -> dict:
    """A valid request for ``m`` (or ``u``), then some of its parts replaced by something drawn."""
    rows = draw(st.integers(1, 3))
    spec = {"name": "x", "datatype": "FP32", "shape": [rows, 1], "data": [[float(i)] for i in range(rows)]}
    for key, strategy in (("name", names), ("datatype", datatypes), ("shape", shapes), ("data", data),
                          ("parameters", parameters)):
        if draw(st.booleans()):
            spec[key] = draw(strategy)
    inputs = [spec] + draw(st.lists(st.fixed_dictionaries({"name": names, "datatype": datatypes, "shape": shapes},
                                                          optional={"data": data}), max_size=1))
    request = {"inputs": draw(st.sampled_from([inputs, inputs[:1]]) | junk) if draw(st.booleans()) else inputs[:1]}
    if draw(st.booleans()):
        request["parameters"] = draw(parameters)
    if draw(st.booleans()):
        request["outputs"] = draw(st.lists(st.fixed_dictionaries({"name": names}, optional={"parameters": parameters}),
                                           max_size=2) | junk)
    if draw(st.booleans()):
        request["id"] = draw(junk)
    return request


def encode(request) -> bytes:
    return json.dumps(request, allow_nan=True).encode()


@st.composite
def http_bodies(draw) -> tuple[bytes, dict]:
    """``(body, headers)``: JSON, JSON + binary tensor data, raw bytes or deep nesting."""
    kind = draw(st.sampled_from(["json", "junk-json", "binary", "bytes", "nested"]))
    headers = {"Content-Type": "application/json"}
    if kind == "json":
        return encode(draw(plausible())), headers
    if kind == "junk-json":
        return encode(draw(junk)), headers
    if kind == "nested":
        depth = draw(st.sampled_from([100, 5_000, 30_000]))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        return (opener * depth + "1" + closer * depth).encode(), headers
    if kind == "bytes":
        payload = draw(st.binary(max_size=64))
    else:  # the binary tensor extension: a JSON header, then raw tensor bytes
        request = draw(plausible())
        blob = draw(st.binary(max_size=24))
        for spec in request["inputs"] if isinstance(request["inputs"], list) else []:
            if isinstance(spec, dict) and draw(st.booleans()):
                spec.pop("data", None)
                spec["parameters"] = {"binary_data_size": draw(st.sampled_from([len(blob), 4, 0]) | numbers)}
        header = encode(request)
        payload = header + blob
        length = draw(st.sampled_from([len(header), len(header) - 1, len(payload), len(payload) + 1, 0, -1]) | big_ints)
        headers[HEADER_LENGTH] = str(length)
    if draw(st.booleans()):
        headers[HEADER_LENGTH] = draw(st.sampled_from(["", "abc", "1e3", "+5", "0x10", "-0", str(len(payload))]))
    return payload, headers


def sets_timeout(payload: bytes) -> bool:
    """Whether the request carries a positive ``timeout`` parameter (which may expire: 504)."""
    try:
        params = json.loads(payload).get("parameters")
        return params["timeout"] > 0
    except Exception:
        return False


paths = st.sampled_from(["/v2/models/m/infer", "/v2/models/m/versions/1/infer", "/v2/models/u/infer",
                         "/v2/models/m/versions/0/infer", "/v2/models/m/versions/x/infer", "/v2/models/nope/infer"])
user_ids = st.none() | st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(path=paths, body=http_bodies(), user=user_ids)
def test_infer_never_answers_a_server_error(server, path, body, user):
    payload, headers = body
    if user is not None:
        headers = {**headers, "X-User-Id": user}
    r = server.post(path, content=payload, headers=headers)
    if r.status_code == 504:
        assert sets_timeout(payload), r.text
    else:
        assert r.status_code < 500, (r.status_code, r.text, payload[:300], headers)
    if r.status_code >= 400:
        assert isinstance(r.json()["error"], str)
    else:
        assert r.status_code == 200 and r.json()["model_name"] in ("m", "u")
    assert server.get("/v2/health/live").status_code == 200


policies = st.fixed_dictionaries({"policy": st.sampled_from(["latest", "pinned", "weighted", "ab"]) | junk},
                                 optional={"version": numbers | junk, "weights": st.dictionaries(
                                     st.sampled_from(["1", "2", "01", "x", ""]), numbers | junk, max_size=3) | junk,
                                           "seed": numbers | junk, "control_ratio": numbers | junk,
                                           "metrics": st.lists(junk, max_size=2) | junk, "control": numbers | junk,
                                           "treatment": numbers | junk, "name": junk, "extra": junk})
outcomes = st.fixed_dictionaries({}, optional={"key": st.sampled_from(["u1", ""]) | junk,
                                               "metric": st.sampled_from(["conversion", "click"]) | junk,
                                               "value": extremes | numbers | junk})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(policy=policies | junk, outcome=outcomes | junk)
def test_management_json_never_answers_a_server_error(server, policy, outcome):
    auth = {"Authorization": f"Bearer {KEY}"}
    r = server.put("/v2/models/m/routing", content=encode(policy), headers=auth)
    assert r.status_code in (200, 400), r.text
    server.post("/v2/models/m/infer", json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1],
                                                        "data": [1.0]}]}, headers={"X-User-Id": "u1"})
    r = server.post("/v2/models/m/experiment/outcome", content=encode(outcome), headers=auth)
    assert r.status_code in (200, 400, 404), r.text
    assert server.get("/v2/models/m/experiment", headers=auth).status_code in (200, 404)
    assert server.delete("/v2/models/m/routing", headers=auth).status_code == 200
