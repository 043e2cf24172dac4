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
import openai
import pytest
import torch
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton
import yaml

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


def test_sigterm_drains_in_flight_streams_whole(tmp_path):
    """Four completions are streaming when SIGTERM arrives: each still ends whole (every token, finish_reason
    "length", the usage chunk), the server exits 0 saying it drained, and once it began stopping a new request is
    refused at the socket while the four streams are still running.

    No timing is assumed: each client reads its first chunk (the stream is in flight) and then stops reading
    until the refusal has been seen (the gate ``resume``), so none can have finished by then however fast the
    server decodes; everything the server sent meanwhile waits in the socket and must still arrive whole."""
    torch.manual_seed(0)
    ds.save(ds.MoETransformer(ds.preset("tiny")).eval(), ds.byte_tokenizer(), tmp_path / "repo" / "lm" / "1")
    generation = {"max_running": 4, "max_batched_tokens": 36, "prefill_chunk": 32, "max_queue": 8}
    (tmp_path / "repo" / "lm" / "config.yaml").write_text(yaml.safe_dump({"backend": "deepseek",
                                                                          "generation": generation}))
    port = free_port()
    server = start_server("--model-repository", str(tmp_path / "repo"), "--http-port", str(port), "--no-grpc")
    wait_ready(server, port)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    n_streams, max_tokens = 4, 900  # prompt + 900 < max_seq_len
    tokens, usages, finish_reasons, errors = [0] * n_streams, [None] * n_streams, [None] * n_streams, []
    all_streaming = threading.Barrier(n_streams + 1)
    resume = threading.Event()  # set once the refusals were seen: until then no client reads past its first chunk

    def stream(i: int) -> None:
        try:  # logprobs: one chunk per token, each naming its token, so a lost chunk shows in the count
            chunks = client.completions.create(model="lm", prompt=f"def f{i}(x):\n    return x * {i}",
                                               max_tokens=max_tokens, temperature=0, logprobs=1, stream=True,
                                               stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            for n, chunk in enumerate(chunks):
                if n == 0:  # the first chunk was read: this stream is in flight; hold it there
                    all_streaming.wait(60)
                    assert resume.wait(120), "the test never resumed the streams"
                if chunk.choices:
                    tokens[i] += len(chunk.choices[0].logprobs.tokens) if chunk.choices[0].logprobs else 0
                    finish_reasons[i] = chunk.choices[0].finish_reason or finish_reasons[i]
                if chunk.usage is not None:
                    usages[i] = chunk.usage
        except Exception as exc:  # fails the test below, with its repr
            errors.append(repr(exc))
            all_streaming.abort()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(n_streams)]
    for t in threads:
        t.start()
    try:
        try:
            all_streaming.wait(60)  # every stream has its first chunk: all four are in flight
        except threading.BrokenBarrierError:
            raise AssertionError(f"a stream failed before SIGTERM: {errors}") from None
        server.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while True:  # uvicorn closes its listening socket within its 0.1 s tick; until then requests still land
            try:  # a cheap request: one accepted in that instant is answered at once, not queued behind the streams
                httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=60, headers={"Connection": "close"})
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
                break
            assert time.monotonic() < deadline, "the server kept accepting connections after SIGTERM"
        with pytest.raises(httpx.ConnectError):  # a new completion now is refused, not half-served
            httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"model": "lm", "prompt": "late", "max_tokens": 2})
        refused_while_draining = all(t.is_alive() for t in threads)
        resume.set()
        out, err = server.communicate(timeout=60)
    finally:
        resume.set()
        if server.poll() is None:
            server.kill()
            server.communicate()
        for t in threads:
            t.join(60)
    assert not errors, errors
    assert server.returncode == 0, err
    assert "drained" in out
    assert refused_while_draining  # the refusals above came while the four streams were still running
    assert tokens == [max_tokens] * n_streams
    assert [u.completion_tokens for u in usages] == [max_tokens] * n_streams
    assert finish_reasons == ["length"] * n_streams


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
