"""``ds serve MODEL_DIR`` as a user runs it: a real process, a real client, a clean stop on SIGTERM."""

import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import torch
import tritonclient.http as triton

import deepseek as ds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ds_serve_a_model_directory_answers_tritonclient_and_stops_cleanly(tmp_path):
    model = ds.MoETransformer(ds.preset("tiny")).eval()
    ds.save(model, ds.byte_tokenizer(), tmp_path / "code-moe")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "deepseek.cli.main", "serve", str(tmp_path / "code-moe"),
                               "--http-port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:  # poll readiness (not a timed wait): the server loads the model before it listens
            assert server.poll() is None, server.communicate()[1]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.1)
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_model_ready("code-moe")
        ids = np.array([[10, 20, 30, 40]], dtype=np.int64)
        inp = triton.InferInput("input_ids", list(ids.shape), "INT64")
        inp.set_data_from_numpy(ids)
        logits = client.infer("code-moe", [inp]).as_numpy("logits")
        with torch.no_grad():
            expected = model(torch.from_numpy(ids)).float().numpy()
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
        bad = httpx.post(f"http://127.0.0.1:{port}/v2/models/code-moe/infer", content=b"{not json")
        assert bad.status_code == 400 and "error" in bad.json()
        assert client.is_server_live()  # still serving after the bad request
    finally:
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=60)
    assert server.returncode == 0, err
    assert "serving" in out and "drained" in out
