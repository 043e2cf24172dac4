"""``ds serve`` as a user runs it: a real process, real clients (HTTP and gRPC), a clean stop on SIGTERM."""

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import torch
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton

import deepseek as ds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "deepseek.cli.main", "serve", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_ready(server: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 60
    while True:  # poll readiness (not a timed wait): the server loads the model before it listens
        assert server.poll() is None, server.communicate()[1]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not become ready"
        time.sleep(0.1)


def stop(server: subprocess.Popen) -> tuple[str, str]:
    server.send_signal(signal.SIGTERM)
    out, err = server.communicate(timeout=60)
    assert server.returncode == 0, err
    return out, err


def test_ds_serve_a_model_directory_answers_http_and_grpc_and_stops_cleanly(tmp_path):
    model = ds.MoETransformer(ds.preset("tiny")).eval()
    ds.save(model, ds.byte_tokenizer(), tmp_path / "code-moe")
    port, grpc_port = free_port(), free_port()
    server = start_server(str(tmp_path / "code-moe"), "--http-port", str(port), "--grpc-port", str(grpc_port))
    try:
        wait_ready(server, port)
        ids = np.array([[10, 20, 30, 40]], dtype=np.int64)
        with torch.no_grad():
            expected = model(torch.from_numpy(ids)).float().numpy()
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_model_ready("code-moe")
        inp = triton.InferInput("input_ids", list(ids.shape), "INT64")
        inp.set_data_from_numpy(ids)
        np.testing.assert_allclose(client.infer("code-moe", [inp]).as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)
        grpc_client = triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        ginp = triton_grpc.InferInput("input_ids", list(ids.shape), "INT64")
        ginp.set_data_from_numpy(ids)
        np.testing.assert_allclose(grpc_client.infer("code-moe", [ginp]).as_numpy("logits"), expected,
                                   rtol=1e-5, atol=1e-5)
        bad = httpx.post(f"http://127.0.0.1:{port}/v2/models/code-moe/infer", content=b"{not json")
        assert bad.status_code == 400 and "error" in bad.json()
        assert client.is_server_live()  # still serving after the bad request
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'ds_inference_requests_total{model="code-moe",outcome="success",version="1"} 2.0' in metrics
        # no --api-key: the management API is off
        assert httpx.post(f"http://127.0.0.1:{port}/v2/repository/models/code-moe/unload").status_code == 403
    finally:
        out, _ = stop(server)
    assert "serving" in out and "drained" in out and "management API disabled" in out


def test_sigterm_under_load_loses_no_accepted_request(tmp_path):
    """Clients hammer the server; SIGTERM arrives mid-load. Every request the server accepted is answered 200
    (the access log lists what it accepted); the rest were refused at the socket, never half-served."""
    torch.manual_seed(0)
    model = ds.MoETransformer(ds.preset("tiny")).eval()
    ds.save(model, ds.byte_tokenizer(), tmp_path / "repo" / "lm" / "1")
    log = tmp_path / "access.jsonl"
    port = free_port()
    server = start_server("--model-repository", str(tmp_path / "repo"), "--http-port", str(port), "--no-grpc",
                          "--access-log", str(log))
    wait_ready(server, port)
    body = {"inputs": [{"name": "input_ids", "shape": [1, 16], "datatype": "INT64", "data": list(range(16))}]}
    ok, refused, lost = [], [], []
    enough = threading.Event()
    stop_clients = threading.Event()

    def client() -> None:
        while not stop_clients.is_set():
            try:  # a fresh connection per request: a refused connection is then unambiguous
                r = httpx.post(f"http://127.0.0.1:{port}/v2/models/lm/infer", json=body, timeout=60,
                               headers={"Connection": "close"})
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                refused.append(type(exc).__name__)
                if server.poll() is not None:
                    return
                continue
            (ok if r.status_code == 200 else lost).append(r.status_code)
            if len(ok) >= 20:
                enough.set()

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        assert enough.wait(120), "no load reached the server"
    finally:
        out, _ = stop(server)
        stop_clients.set()
        for t in threads:
            t.join(60)
    accepted = [json.loads(line) for line in log.read_text().splitlines()]
    assert not lost, f"answered with errors: {lost}"
    assert all(entry["status"] == 200 for entry in accepted)
    assert len(accepted) == len(ok)  # every accepted request reached its client
    assert "drained" in out


def test_a_port_in_use_is_a_one_line_error(tmp_path):
    ds.save(ds.MoETransformer(ds.preset("tiny")), ds.byte_tokenizer(), tmp_path / "m")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "deepseek.cli.main", "serve", str(tmp_path / "m"),
                                 "--http-port", str(port), "--no-grpc"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"cannot serve HTTP on 127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr
