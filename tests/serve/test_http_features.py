"""Serving features over a real HTTP server: back-pressure, deadlines, client cancellation, priorities, canary
and A/B routing, API keys, hot reload under load, configuration and statistics, the access log.

Requests are held in compute by :data:`gated_model.GATE` (a forward call that waits for the test), so every
"one request computing, one queued" situation is set up deterministically and waited for with bounded polling.
"""

import json
import math
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
httpclient = pytest.importorskip("tritonclient.http")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from deepseek.serve.manager import ModelManager  # noqa: E402
from deepseek.serve.protocols.common import AccessLog  # noqa: E402
from deepseek.serve.repository import ModelRepository  # noqa: E402

from .gated_model import GATE, model_config, running_server, wait_for, write_model  # noqa: E402

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}


def body(value: float, rows: int = 1, **parameters) -> dict:
    """An infer request for the gated model: ``rows`` rows of ``value`` (the value tags the request)."""
    b = {"inputs": [{"name": "x", "shape": [rows, 1], "datatype": "FP32", "data": [value] * rows}]}
    if parameters:
        b["parameters"] = parameters
    return b


def post(base: str, model: str, value: float, *, headers=None, **parameters) -> httpx.Response:
    return httpx.post(f"{base}/v2/models/{model}/infer", json=body(value, **parameters), headers=headers, timeout=60)


def output(r: httpx.Response) -> list:
    assert r.status_code == 200, r.text
    return r.json()["outputs"][0]["data"]


def metric_samples(base: str) -> dict:
    """``{(sample name, sorted label items): value}`` from GET /metrics."""
    text = httpx.get(f"{base}/metrics", timeout=60).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def requests_total(base: str, model: str, outcome: str, version: str = "1") -> float:
    key = ("ds_inference_requests_total", (("model", model), ("outcome", outcome), ("version", version)))
    return metric_samples(base).get(key, 0.0)


@pytest.fixture
def gate():
    GATE.reset()
    yield GATE
    GATE.reset()


def held_server(tmp_path, config, **app_kwargs):
    """One gated model ``m`` (version 1) in a fresh repository, served."""
    write_model(tmp_path, "m", config=config)
    manager = ModelManager(ModelRepository(tmp_path))
    return manager, running_server(manager, **app_kwargs)


# -- back-pressure, deadlines, cancellation, priorities -------------------------------------------------------

def test_queue_full_answers_429_with_retry_after(tmp_path, gate):
    config = model_config(dynamic_batching={"max_queue_size": 1, "max_queue_delay_ms": 0})
    manager, server = held_server(tmp_path, config)
    gate.close()
    with server as base, ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, base, "m", 1.0)
        wait_for(lambda: gate.calls == 1, "the first request to compute")
        batcher = manager.get("m").batcher
        second = pool.submit(post, base, "m", 2.0)
        wait_for(lambda: batcher.queue_size == 1, "the second request to queue")
        r = post(base, "m", 3.0)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "queue full" in r.json()["error"]
        gate.open()
        assert output(first.result()) == [2.0] and output(second.result()) == [4.0]
        assert output(post(base, "m", 5.0)) == [10.0]  # still serving
        assert gate.values() == [[1.0], [2.0], [5.0]]  # the rejected request never reached the model
        assert batcher.stats.rejected == 1
        assert requests_total(base, "m", "rejected") == 1 and requests_total(base, "m", "success") == 3


def test_request_timeout_answers_504_and_never_computes(tmp_path, gate):
    manager, server = held_server(tmp_path, model_config(dynamic_batching={"max_queue_delay_ms": 0}))
    gate.close()
    with server as base, ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, base, "m", 1.0)
        wait_for(lambda: gate.calls == 1, "the first request to compute")
        r = post(base, "m", 2.0, timeout=1000)  # µs, as Triton: 1 ms, queued behind the held request
        assert r.status_code == 504 and "1 ms" in r.json()["error"]
        # tritonclient's `timeout` is the same request parameter, in microseconds
        client = httpclient.InferenceServerClient(urlparse(base).netloc)
        try:
            inp = httpclient.InferInput("x", [1, 1], "FP32")
            inp.set_data_from_numpy(np.full((1, 1), 3.0, dtype=np.float32))
            with pytest.raises(InferenceServerException) as info:
                client.infer("m", [inp], timeout=1000)
            assert info.value.status() == "504"
        finally:
            client.close()
        gate.open()
        assert output(first.result()) == [2.0]
        assert output(post(base, "m", 4.0, timeout=30_000_000)) == [8.0]  # a generous deadline is met
        assert gate.values() == [[1.0], [4.0]]
        batcher = manager.get("m").batcher
        assert batcher.stats.expired == 2
        assert requests_total(base, "m", "timeout") == 2


def test_client_disconnect_drops_the_queued_request(tmp_path, gate):
    manager, server = held_server(tmp_path, model_config(dynamic_batching={"max_queue_delay_ms": 0}))
    gate.close()
    with server as base, ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, base, "m", 1.0)
        wait_for(lambda: gate.calls == 1, "the first request to compute")
        batcher = manager.get("m").batcher
        url = urlparse(base)
        payload = json.dumps(body(2.0)).encode()
        raw = socket.create_connection((url.hostname, url.port))
        raw.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
        wait_for(lambda: batcher.queue_size == 1, "the second request to queue")
        raw.close()  # the client gives up while its request waits
        wait_for(lambda: requests_total(base, "m", "cancelled") == 1, "the server to see the disconnect")
        gate.open()
        assert output(first.result()) == [2.0]
        assert output(post(base, "m", 3.0)) == [6.0]
        assert gate.values() == [[1.0], [3.0]]  # the dropped request's input never reached the model
        assert batcher.stats.dropped == 1 and batcher.stats.requests == 3


def test_higher_priority_request_is_computed_first(tmp_path, gate):
    config = model_config(max_batch_size=1, dynamic_batching={"max_queue_delay_ms": 0, "priority_levels": 2})
    manager, server = held_server(tmp_path, config)
    gate.close()
    with server as base, ThreadPoolExecutor(3) as pool:
        first = pool.submit(post, base, "m", 1.0)
        wait_for(lambda: gate.calls == 1, "the first request to compute")
        batcher = manager.get("m").batcher
        low = pool.submit(post, base, "m", 2.0, priority=2)
        wait_for(lambda: batcher.queue_size == 1, "the low-priority request to queue")

        def high_with_tritonclient():  # tritonclient's `priority` is the same request parameter
            client = httpclient.InferenceServerClient(urlparse(base).netloc)
            try:
                inp = httpclient.InferInput("x", [1, 1], "FP32")
                inp.set_data_from_numpy(np.full((1, 1), 3.0, dtype=np.float32))
                return client.infer("m", [inp], priority=1).as_numpy("y").tolist()
            finally:
                client.close()

        high = pool.submit(high_with_tritonclient)
        wait_for(lambda: batcher.queue_size == 2, "the high-priority request to queue")
        gate.open()
        assert output(first.result()) == [2.0] and output(low.result()) == [4.0] and high.result() == [[6.0]]
    assert gate.values() == [[1.0], [3.0], [2.0]]


# -- routing: canary weights and a sticky A/B experiment ---------------------------------------------------------

@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A server with an API key: two-version models ``canary`` and ``ab``, and ``stats`` (dynamic batching)."""
    root = tmp_path_factory.mktemp("repo")
    two_versions = model_config(version_policy={"all": True})
    write_model(root, "canary", versions=[1, 2], config=two_versions)
    write_model(root, "ab", versions=[1, 2], config=two_versions)
    write_model(root, "stats", config=model_config(dynamic_batching={"max_queue_delay_ms": 2.5, "max_queue_size": 16}))
    manager = ModelManager(ModelRepository(root))
    GATE.reset()
    with running_server(manager, api_key=KEY) as base, httpx.Client(base_url=base, timeout=60) as http:
        yield {"base": base, "http": http, "manager": manager}


def test_canary_weights_split_traffic_and_change_at_run_time(shared):
    http = shared["http"]
    r = http.put("/v2/models/canary/routing", json={"policy": "weighted", "weights": {"1": 90, "2": 10}, "seed": 0},
                 headers=AUTH)
    assert r.status_code == 200, r.text
    assert http.get("/v2/models/canary/routing", headers=AUTH).json() == \
        {"policy": "weighted", "weights": {"1": 90, "2": 10}, "seed": 0}

    def share_of_v2(n: int) -> float:
        versions = [http.post("/v2/models/canary/infer", json=body(1.0)).json()["model_version"] for _ in range(n)]
        assert set(versions) <= {"1", "2"}
        return versions.count("2") / n

    n = 1000
    assert abs(share_of_v2(n) - 0.1) < 4 * math.sqrt(0.1 * 0.9 / n)  # 4 sigma of the binomial
    r = http.put("/v2/models/canary/routing", json={"policy": "weighted", "weights": {"1": 1, "2": 1}, "seed": 1},
                 headers=AUTH)
    assert r.status_code == 200, r.text
    assert abs(share_of_v2(400) - 0.5) < 4 * math.sqrt(0.25 / 400)
    # a routing key makes the split sticky
    sticky = {http.post("/v2/models/canary/infer", json=body(1.0), headers={"X-User-Id": "alice"})
              .json()["model_version"] for _ in range(10)}
    assert len(sticky) == 1
    # a named version bypasses the policy
    assert http.post("/v2/models/canary/versions/1/infer", json=body(1.0)).json()["model_version"] == "1"
    samples = metric_samples(shared["base"])
    routed = {v: samples[("ds_routing_requests_total", (("model", "canary"), ("policy", "weighted"),
                                                        ("variant", ""), ("version", v)))] for v in ("1", "2")}
    assert routed["1"] + routed["2"] == n + 400 + 10
    r = http.delete("/v2/models/canary/routing", headers=AUTH)
    assert r.json() == {"policy": "latest"}
    assert http.post("/v2/models/canary/infer", json=body(1.0)).json()["model_version"] == "2"


def test_ab_experiment_is_sticky_and_reports_outcomes(shared):
    http = shared["http"]
    r = http.put("/v2/models/ab/routing", json={"policy": "ab", "control_ratio": 0.7, "metrics": ["click"], "seed": 0},
                 headers=AUTH)
    assert r.status_code == 200, r.text
    assigned, served = {}, {"control": 0, "treatment": 0}
    for rep in range(2):
        for i in range(40):
            user = f"u{i}"
            r = http.post("/v2/models/ab/infer", json=body(1.0), headers={"X-User-Id": user})
            assert r.status_code == 200, r.text
            variant = r.headers["X-Routing-Variant"]
            assert r.json()["parameters"] == {"routing_variant": variant}
            assert r.json()["model_version"] == {"control": "1", "treatment": "2"}[variant]  # 2nd-highest / highest
            assert assigned.setdefault(user, variant) == variant  # the same user always gets the same version
            served[variant] += 1
    # the routing_key request parameter is the same key as the header
    r = http.post("/v2/models/ab/infer", json=body(1.0, routing_key="u1"))
    assert r.headers["X-Routing-Variant"] == assigned["u1"]
    served[assigned["u1"]] += 1
    users = {v: sum(1 for a in assigned.values() if a == v) for v in ("control", "treatment")}
    assert users["control"] > 0 and users["treatment"] > 0

    r = http.post("/v2/models/ab/experiment/outcome", json={"key": "u1", "metric": "click"}, headers=AUTH)
    assert r.status_code == 200 and r.json() == {"key": "u1", "metric": "click", "variant": assigned["u1"]}
    assert http.post("/v2/models/ab/experiment/outcome", json={"key": "nobody", "metric": "click"},
                     headers=AUTH).status_code == 404
    assert http.post("/v2/models/ab/experiment/outcome", json={"key": "u1", "metric": "buy"},
                     headers=AUTH).status_code == 400
    assert http.get("/v2/models/canary/experiment", headers=AUTH).status_code == 404  # no experiment there

    report = http.get("/v2/models/ab/experiment", headers=AUTH).json()
    for variant in ("control", "treatment"):
        row = report["variants"][variant]
        assert row["exposures"] == users[variant] and row["requests"] == served[variant]
        click = row["metrics"]["click"]
        converted = 1 if variant == assigned["u1"] else 0
        assert click["conversions"] == converted and click["rate"] == converted / users[variant]
        low, high = click["ci95"]
        assert 0 <= low <= click["rate"] <= high <= 1
    samples = metric_samples(shared["base"])
    for variant, version in (("control", "1"), ("treatment", "2")):
        key = ("ds_routing_requests_total", (("model", "ab"), ("policy", "ab"), ("variant", variant),
                                             ("version", version)))
        assert samples[key] == served[variant]


# -- API keys ----------------------------------------------------------------------------------------------

MANAGEMENT = [("GET", "/v2/models/canary/routing", None), ("PUT", "/v2/models/canary/routing", {"policy": "latest"}),
              ("DELETE", "/v2/models/canary/routing", None), ("GET", "/v2/models/ab/experiment", None),
              ("POST", "/v2/models/ab/experiment/outcome", {"key": "u1", "metric": "click"}),
              ("POST", "/v2/repository/models/canary/load", None),
              ("POST", "/v2/repository/models/canary/unload", None)]


def test_management_needs_the_api_key(shared):
    http = shared["http"]
    for method, path, payload in MANAGEMENT:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}, {"Authorization": KEY}):
            r = http.request(method, path, json=payload, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.headers["www-authenticate"] == "Bearer" and "API key" in r.json()["error"]
    assert http.get("/v2/models/canary/routing", headers=AUTH).status_code == 200
    assert http.get("/v2/models/canary/routing", headers={"X-API-Key": KEY}).status_code == 200
    # with the key, a load in model-control mode "none" is refused for what it is (not for the key)
    r = http.post("/v2/repository/models/canary/load", headers=AUTH)
    assert r.status_code == 400 and "explicit" in r.json()["error"]
    # inference and model routes stay open
    assert http.get("/v2/models/canary/ready").status_code == 200
    assert output(http.post("/v2/models/canary/infer", json=body(1.0))) == [2.0]


def test_server_without_a_key_refuses_management_and_protect_inference(tmp_path, gate):
    write_model(tmp_path, "canary")
    manager = ModelManager(ModelRepository(tmp_path))
    with running_server(manager) as base, httpx.Client(base_url=base, timeout=60) as http:
        for method, path, payload in MANAGEMENT:
            if "/ab/" in path:
                continue
            r = http.request(method, path, json=payload, headers=AUTH)
            assert r.status_code == 403 and "--api-key" in r.json()["error"], (method, path, r.text)
        assert output(http.post("/v2/models/canary/infer", json=body(1.0))) == [2.0]

    manager = ModelManager(ModelRepository(tmp_path))
    with running_server(manager, api_key=KEY, protect_inference=True) as base, \
            httpx.Client(base_url=base, timeout=60) as http:
        assert http.post("/v2/models/canary/infer", json=body(1.0)).status_code == 401
        assert http.post("/v2/models/canary/infer", json=body(1.0), headers={"X-API-Key": "no"}).status_code == 401
        assert output(http.post("/v2/models/canary/infer", json=body(1.0), headers=AUTH)) == [2.0]
        assert http.get("/v2/health/ready").status_code == 200  # health stays open for probes


# -- hot reload --------------------------------------------------------------------------------------------

def test_hot_reload_under_load_fails_no_request(tmp_path, gate):
    write_model(tmp_path, "m", versions=[1], config=model_config(dynamic_batching={"max_queue_delay_ms": 1}))
    manager = ModelManager(ModelRepository(tmp_path), control_mode="explicit", startup_models=["m"])
    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def hammer(base: str) -> None:
        with httpx.Client(base_url=base, timeout=60) as http:
            while not stop.is_set():
                r = http.post("/v2/models/m/infer", json=body(1.0))
                results.append((r.status_code, r.json().get("model_version") if r.status_code == 200 else r.text))

    def answered_by(version: str) -> int:
        return sum(1 for status, v in list(results) if v == version)

    with running_server(manager, api_key=KEY) as base, ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(hammer, base) for _ in range(4)]
        try:
            wait_for(lambda: answered_by("1") >= 20, "traffic on version 1")
            (tmp_path / "m" / "2").mkdir()
            for _ in range(3):  # a new version, then reloads of the same one: each swap happens under load
                before = answered_by("2")
                r = httpx.post(f"{base}/v2/repository/models/m/load", headers=AUTH, timeout=60)
                assert r.status_code == 200, r.text
                wait_for(lambda: answered_by("2") >= before + 20, "traffic on the reloaded version 2")
        finally:
            stop.set()
            for w in workers:
                w.result()
        failed = [r for r in results if r[0] != 200]
        assert not failed, failed[:5]
        assert output(post(base, "m", 1.0)) == [2.0]
        assert post(base, "m", 1.0).json()["model_version"] == "2"
        assert httpx.get(f"{base}/v2/models/m/versions/1").status_code == 404  # latest: 1 serves only version 2


def test_poll_mode_picks_up_a_new_version(tmp_path, gate):
    write_model(tmp_path, "m", versions=[1])
    manager = ModelManager(ModelRepository(tmp_path), control_mode="poll")
    with running_server(manager, api_key=KEY, poll_interval_s=0.02) as base:
        assert post(base, "m", 1.0).json()["model_version"] == "1"
        (tmp_path / "m" / "2").mkdir()
        wait_for(lambda: post(base, "m", 1.0).json().get("model_version") == "2", "the poll to load version 2")
        r = httpx.post(f"{base}/v2/repository/models/m/load", headers=AUTH, timeout=60)
        assert r.status_code == 400 and "poll" in r.json()["error"]  # poll mode follows the repository only


# -- configuration, statistics, access log ---------------------------------------------------------------------

def test_config_and_statistics_with_tritonclient(shared):
    client = httpclient.InferenceServerClient(urlparse(shared["base"]).netloc)
    try:
        config = client.get_model_config("stats")
        assert config["max_batch_size"] == 8
        assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 2500
        assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 16
        assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [1], "optional": False}]
        for i in range(3):  # one after another: each request is its own batch of 2 rows
            inp = httpclient.InferInput("x", [2, 1], "FP32")
            inp.set_data_from_numpy(np.full((2, 1), i, dtype=np.float32))
            assert client.infer("stats", [inp]).as_numpy("y").tolist() == [[2.0 * i]] * 2
        stats = client.get_inference_statistics("stats")["model_stats"]
        assert [(s["name"], s["version"]) for s in stats] == [("stats", "1")]
        s = stats[0]
        assert s["inference_count"] == 6 and s["execution_count"] == 3
        assert s["inference_stats"]["success"]["count"] == 3 and s["inference_stats"]["fail"]["count"] == 0
        assert [b["batch_size"] for b in s["batch_stats"]] == [2]
        assert s["batch_stats"][0]["compute_infer"]["count"] == 3 and s["batch_stats"][0]["compute_infer"]["ns"] > 0
        assert s["last_inference"] > 0
        with pytest.raises(InferenceServerException) as info:
            client.get_inference_statistics("nope")
        assert info.value.status() == "404"
    finally:
        client.close()


def test_access_log_writes_one_json_line_per_request(tmp_path, gate):
    log = AccessLog(tmp_path / "access.log")
    manager, server = held_server(tmp_path / "repo", model_config(dynamic_batching={"max_queue_delay_ms": 0}),
                                  access_log=log)
    with server as base:
        assert output(post(base, "m", 1.0, rows=1)) == [2.0]
        r = httpx.post(f"{base}/v2/models/m/infer", json=body(1.0, rows=3), timeout=60)
        assert r.status_code == 200
        bad = body(1.0)
        bad["inputs"][0]["shape"] = [1]  # the model wants [batch, 1]
        bad["id"] = "bad-1"
        assert httpx.post(f"{base}/v2/models/m/infer", json=bad, timeout=60).status_code == 400
    log.close()
    lines = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
    assert [(r["model"], r["version"], r["status"], r["batch_size"]) for r in lines] == \
        [("m", 1, 200, 1), ("m", 1, 200, 3), ("m", 1, 400, 0)]
    assert lines[2]["id"] == "bad-1"
    for record in lines:
        assert {"time", "queue_ms", "compute_ms", "total_ms", "variant"} <= set(record)
        assert record["queue_ms"] >= 0 and record["compute_ms"] >= 0 and record["total_ms"] >= record["queue_ms"]
        assert record["route"] == "v2/infer" and record["client"] == "127.0.0.1"  # no routing key: the peer
