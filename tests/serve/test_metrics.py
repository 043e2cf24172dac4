"""GET /metrics after real concurrent traffic: the Prometheus text parses and the counters add up."""

from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
httpclient = pytest.importorskip("tritonclient.http")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from deepseek.serve.manager import ModelManager  # noqa: E402
from deepseek.serve.repository import ModelRepository  # noqa: E402

from .gated_model import GATE, infer_scalar, model_config, running_server, wait_for, write_model  # noqa: E402

REQUESTS, CLIENTS = 200, 32


def test_metrics_after_concurrent_requests(tmp_path):
    write_model(tmp_path, "m", config=model_config(max_batch_size=64, dynamic_batching={"max_queue_delay_ms": 2}))
    manager = ModelManager(ModelRepository(tmp_path))
    GATE.reset()
    GATE.close()  # the first request holds the model while the other clients queue: batches of > 1 for sure
    try:
        with running_server(manager) as base:
            netloc = urlparse(base).netloc

            with ThreadPoolExecutor(CLIENTS) as pool:
                futures = [pool.submit(infer_scalar, netloc, i) for i in range(REQUESTS)]
                batcher = manager.get("m").batcher
                # the held batch may have taken more than one request if several arrived at once
                wait_for(lambda: GATE.calls == 1 and len(GATE.values()[0]) + batcher.queue_size == CLIENTS,
                         "every client to queue")
                GATE.open()
                assert [f.result() for f in futures] == [[[2.0 * i]] for i in range(REQUESTS)]
            text = httpx.get(f"{base}/metrics", timeout=60).text
    finally:
        GATE.reset()

    families = {f.name: f for f in text_string_to_metric_families(text)}
    labels = {"model": "m", "version": "1"}

    def value(family: str, sample: str, **extra) -> float:
        wanted = {**labels, **extra}
        found = [s.value for s in families[family].samples if s.name == sample and s.labels == wanted]
        assert len(found) == 1, (sample, wanted)
        return found[0]

    assert value("ds_inference_requests", "ds_inference_requests_total", outcome="success") == REQUESTS
    assert value("ds_inference_request_duration_seconds", "ds_inference_request_duration_seconds_count") == REQUESTS
    batches = value("ds_inference_batch_size", "ds_inference_batch_size_count")
    assert value("ds_inference_batch_size", "ds_inference_batch_size_sum") == REQUESTS  # every row ran once
    assert batches < REQUESTS
    # the held batch and the one formed behind it took all 32 clients' requests: one of them has >= 16 rows
    assert value("ds_inference_batch_size", "ds_inference_batch_size_bucket", le="8.0") < batches
    assert value("nv_inference_count", "nv_inference_count_total") == REQUESTS
    assert value("nv_inference_exec_count", "nv_inference_exec_count_total") == batches
    assert value("nv_inference_request_success", "nv_inference_request_success_total") == REQUESTS
    assert value("ds_inference_queue_size", "ds_inference_queue_size") == 0
    assert value("ds_model_ready", "ds_model_ready") == 1
    rss = [s.value for s in families["process_resident_memory_bytes"].samples]
    assert rss and rss[0] > 0


def test_requests_refused_before_a_model_are_counted_by_status_and_logged(tmp_path):
    import json as _json

    from deepseek.serve.protocols.common import AccessLog

    (tmp_path / "empty").mkdir()
    manager = ModelManager(ModelRepository(tmp_path / "empty"))
    log_path = tmp_path / "access.jsonl"
    with running_server(manager, access_log=AccessLog(log_path)) as url:
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.post("/v2/models/nope/infer", json={"inputs": []}).status_code == 404
            assert http.post("/v2/models/nope/infer", content=b"{").status_code == 400
            families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    refused = {s.labels["status"]: s.value for s in families["ds_inference_refused"].samples
               if s.name == "ds_inference_refused_total"}
    assert refused == {"404": 1.0, "400": 1.0}
    lines = [_json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(line["model"], line["status"]) for line in lines] == [("nope", 404), ("nope", 400)]
