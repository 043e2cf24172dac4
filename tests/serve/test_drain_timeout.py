"""--drain-timeout-secs bounds the SIGTERM drain: a request still held when it runs out is cut (its connection
closes), so a pod stops inside its grace period; with time to spare the same request is answered."""

import threading

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from deepseek.serve.server import Server, ServeError  # noqa: E402

from .gated_model import GATE, model_config, wait_for, write_model  # noqa: E402

BODY = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [3.0]}]}


def held_request(server: Server, outcome: dict) -> threading.Thread:
    def call() -> None:
        try:
            response = httpx.post(f"{server.url}/v2/models/m/infer", json=BODY, timeout=60)
            outcome["status"] = response.status_code
            outcome["data"] = response.json()["outputs"][0]["data"] if response.status_code == 200 else None
        except httpx.HTTPError as exc:  # the server closed the connection without an answer
            outcome["error"] = type(exc).__name__

    thread = threading.Thread(target=call)
    thread.start()
    wait_for(lambda: GATE.calls == 1, "the request to reach the model")
    return thread


@pytest.mark.parametrize("drain_timeout_s", [0.2, 0.0])
def test_a_request_held_past_the_drain_timeout_is_cut_and_one_within_it_is_answered(tmp_path, drain_timeout_s):
    write_model(tmp_path, "m", config=model_config())
    GATE.reset()
    GATE.close()
    server = Server(tmp_path, port=0, drain_timeout_s=drain_timeout_s).start()
    outcome: dict = {}
    stopper = threading.Thread(target=server.stop)
    try:
        client = held_request(server, outcome)
        stopper.start()  # SIGTERM's path: uvicorn stops accepting and drains
        if drain_timeout_s:
            # bounded: the held request is cut while the model is still held (the gate never opened)
            wait_for(lambda: not client.is_alive(), "the held request to be cut")
            assert "error" in outcome or outcome.get("status", 200) >= 500, outcome
        else:
            # 0 = no limit: the request is still waiting, and answered once the model lets it through
            wait_for(lambda: server._uvicorn.should_exit, "the stop to begin")
            assert client.is_alive()
            GATE.open()
            client.join(60)
            assert outcome == {"status": 200, "data": [6.0]}
    finally:
        GATE.open()  # the batch already computing finishes; then the queues drain and the server exits
        if stopper.is_alive() or stopper.ident:
            stopper.join(60)
        GATE.reset()
    assert not stopper.is_alive()


def test_a_negative_drain_timeout_is_a_one_line_error(tmp_path):
    with pytest.raises(ServeError, match="drain timeout must be >= 0"):
        Server(tmp_path, drain_timeout_s=-1)
