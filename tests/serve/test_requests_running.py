"""ds_inference_requests_running: the requests inside an executing batch, beside ds_inference_queue_size (the two
together are what deploy/kubernetes/'s autoscaler scales on)."""

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

CLIENTS = 5


def gauges(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=60).text
    wanted = {"ds_inference_requests_running", "ds_inference_queue_size"}
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name in wanted and s.labels == {"model": "m", "version": "1"}}


def test_running_and_queued_requests_are_gauged_while_the_model_is_held(tmp_path):
    write_model(tmp_path, "m", config=model_config(max_batch_size=2, dynamic_batching={"max_queue_delay_ms": 1}))
    manager = ModelManager(ModelRepository(tmp_path))
    GATE.reset()
    GATE.close()  # the first batch holds the model; the other clients wait in the queue
    try:
        with running_server(manager) as base:
            assert gauges(base) == {"ds_inference_requests_running": 0, "ds_inference_queue_size": 0}
            netloc = urlparse(base).netloc

            with ThreadPoolExecutor(CLIENTS) as pool:
                futures = [pool.submit(infer_scalar, netloc, i) for i in range(CLIENTS)]
                batcher = manager.get("m").batcher
                wait_for(lambda: GATE.calls == 1 and len(GATE.values()[0]) + batcher.queue_size == CLIENTS,
                         "every client to be held or queued")
                held = len(GATE.values()[0])  # one row per request: 1 or 2 requests in the held batch
                assert gauges(base) == {"ds_inference_requests_running": held,
                                        "ds_inference_queue_size": CLIENTS - held}
                GATE.open()
                assert [f.result() for f in futures] == [[[2.0 * i]] for i in range(CLIENTS)]
            assert gauges(base) == {"ds_inference_requests_running": 0, "ds_inference_queue_size": 0}
    finally:
        GATE.reset()
