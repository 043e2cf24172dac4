"""The lean load generator and ``ds bench serve`` against a real uvicorn server (no timing assertions)."""

import contextlib
import http.server
import json
import threading
import time

import pytest
import torch

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
from typer.testing import CliRunner  # noqa: E402

from deepseek.cli.main import app  # noqa: E402
from deepseek.bench import loadgen  # noqa: E402
from deepseek.serve.manager import ModelManager  # noqa: E402
from deepseek.serve.repository import ModelRepository  # noqa: E402

from .gated_model import free_port, linear_config, running_server  # noqa: E402

LINEAR_CONFIG = linear_config(queue_delay_ms=1)
EMBED_CONFIG = """\
backend: torch
max_batch_size: 8
inputs: [{name: ids, datatype: INT64, shape: [-1]}]
outputs: [{name: y, datatype: FP32, shape: [-1, 4]}]
"""


class Embed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 4)

    def forward(self, ids):
        return self.embed(ids)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    torch.manual_seed(0)
    for name, config, module in (("linear", LINEAR_CONFIG, torch.nn.Linear(32, 10)), ("embed", EMBED_CONFIG, Embed())):
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.yaml").write_text(config)
        torch.jit.script(module.eval()).save(str(root / name / "1" / "model.pt"))
    with running_server(ModelManager(ModelRepository(root))) as url:
        yield url


LINEAR_META = {"name": "linear", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 32]}]}


def test_closed_loop_counts_requests_and_orders_percentiles(server):
    bodies = loadgen.build_kserve_bodies(LINEAR_META, n=8, seed=0)
    result = loadgen.run_load(server, "/v2/models/linear/infer", bodies, concurrency=4, warmup_s=0.2,
                              duration_s=0.8, marker=b'"outputs"', label="linear")
    assert result.mode == "closed" and result.concurrency == 4 and result.rate is None
    assert result.completed > 0 and result.errors == {}
    assert result.throughput == pytest.approx(result.completed / 0.8)
    assert 0 < result.p50_ms <= result.p95_ms <= result.p99_ms <= result.max_ms
    assert result.client_cpu_cores >= 0 and result.server_cpu_cores is None
    d = result.to_dict()
    assert d["label"] == "linear" and d["completed"] == result.completed
    table = loadgen.format_table([result])
    assert table.row_count == 1


SERVICE_S = 0.05  # the injected service time of the stub server: every latency the client reports is at least this


@contextlib.contextmanager
def stub_server(service_s: float):
    """A real HTTP/1.1 keep-alive server (the standard library's) that answers every POST after ``service_s``
    and counts the requests it received; yields ``(url, count)`` where ``count()`` reads the tally."""
    received = []
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # the body, written after the headers, goes out at once

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                received.append(1)
            time.sleep(service_s)  # the service time under test, not a synchronisation
            body = b'{"outputs": []}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", lambda: len(received)
    finally:
        server.shutdown()
        server.server_close()


def test_latencies_and_counts_against_a_known_service_time():
    """Every number we publish comes from this client: against a server that takes a known time per request,
    no latency may be shorter than it, and the requests counted are exactly those the server saw, less the one
    each closed-loop connection had in flight when the window closed (answered after it, so not counted)."""
    with stub_server(SERVICE_S) as (url, received):
        result = loadgen.run_load(url, "/infer", [b"{}"], concurrency=3, warmup_s=0, duration_s=0.6,
                                  marker=b'"outputs"')
        assert result.errors == {} and result.completed > 0
        assert result.min_ms >= SERVICE_S * 1e3 and result.p50_ms >= SERVICE_S * 1e3
        assert received() == result.completed + 3
        before = received()
        result = loadgen.run_load(url, "/infer", [b"{}"], rate=40, warmup_s=0, duration_s=0.5, seed=1)
        assert result.errors == {} and result.completed > 0
        assert result.min_ms >= SERVICE_S * 1e3
        # the open loop abandons what is in flight at the window's end: the server saw at least what was counted
        assert received() - before >= result.completed


def test_wrong_path_and_missing_marker_are_errors(server):
    bodies = loadgen.build_kserve_bodies(LINEAR_META, n=2, seed=0)
    result = loadgen.run_load(server, "/v2/models/nope/infer", bodies, concurrency=2, warmup_s=0, duration_s=0.3)
    assert result.completed == 0 and set(result.errors) == {"404"} and result.errors["404"] > 0
    result = loadgen.run_load(server, "/v2/models/linear/infer", bodies, concurrency=1, warmup_s=0, duration_s=0.3,
                              marker=b"no such text")
    assert result.completed == 0 and set(result.errors) == {"200 without marker"}


def test_open_loop_and_server_cpu(server):
    import os
    bodies = loadgen.build_kserve_bodies(LINEAR_META, n=4, seed=1)
    result = loadgen.run_load(server, "/v2/models/linear/infer", bodies, rate=200, warmup_s=0.1, duration_s=0.5,
                              server_pid=os.getpid(), seed=3)
    assert result.mode == "open" and result.rate == 200 and result.concurrency is None
    assert result.completed > 0 and result.errors == {}
    assert result.server_cpu_cores is not None and result.server_cpu_cores >= 0  # this process is the server
    assert result.send_lag_ms is not None and result.send_lag_ms >= 0


def test_connection_refused_is_an_error():
    bodies = [b"{}"]
    result = loadgen.run_load(f"http://127.0.0.1:{free_port()}", "/", bodies, concurrency=1, warmup_s=0,
                              duration_s=0.2)
    assert result.completed == 0 and result.errors.get("ConnectionRefusedError", 0) > 0


def test_kserve_bodies_fill_dynamic_dims_and_are_accepted(server):
    import http.client
    from urllib.parse import urlsplit

    conn = http.client.HTTPConnection(urlsplit(server).hostname, urlsplit(server).port)
    conn.request("GET", "/v2/models/embed")
    meta = json.loads(conn.getresponse().read())
    assert meta["inputs"][0]["shape"] == [-1, -1]
    bodies = loadgen.build_kserve_bodies(meta, n=3, seed=0, shapes={"ids": [5]}, int_high=50)
    assert len(set(bodies)) == 3 and bodies == loadgen.build_kserve_bodies(meta, 3, 0, {"ids": [5]}, 50)
    for body in bodies:
        request = json.loads(body)["inputs"][0]
        assert request["shape"] == [1, 5] and all(0 <= v < 50 for v in request["data"])
        conn.request("POST", "/v2/models/embed/infer", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        answer = json.loads(response.read())
        assert response.status == 200 and answer["outputs"][0]["shape"] == [1, 5, 4]
    conn.close()
    with pytest.raises(ValueError, match="unknown input"):
        loadgen.build_kserve_bodies(meta, 1, shapes={"x": [1]})


def test_fill_shape_and_chunked_parsing():
    assert loadgen.fill_shape([-1, 32]) == [1, 32]
    assert loadgen.fill_shape([-1, -1], [64]) == [1, 64]
    assert loadgen.fill_shape([-1], [7]) == [7]  # as many sizes as -1 dims: no batch dimension
    assert loadgen.fill_shape([-1, -1], [2, 3]) == [2, 3]
    with pytest.raises(ValueError):
        loadgen.fill_shape([4], [2])
    buf = bytearray(b"4\r\nabcd\r\n3;ext=1\r\nefg\r\n0\r\n\r\nNEXT")
    assert loadgen._parse_chunked(buf) == (b"abcdefg", len(buf) - 4)
    assert loadgen._parse_chunked(bytearray(b"4\r\nab")) is None
    assert loadgen.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5


def test_ds_bench_serve_against_a_url_writes_json(server, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "serve", "--model", "linear", "--url", server, "--duration", "0.5",
                                      "--warmup", "0", "--concurrency", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert {"model", "url", "raw", "results", "served_over_raw_best"} <= set(data)
    assert data["model"] == "linear" and data["raw"] is None and len(data["results"]) == 1
    row = data["results"][0]
    assert {"mode", "concurrency", "throughput", "p50_ms", "p95_ms", "p99_ms", "errors", "client_cpu_cores",
            "server_cpu_cores"} <= set(row)
    assert row["concurrency"] == 2 and row["completed"] > 0 and row["errors"] == {}


def test_ds_bench_serve_usage_errors(server):
    result = CliRunner().invoke(app, ["bench", "serve", "--model", "linear"])
    assert result.exit_code == 2 and "--url" in result.output
    result = CliRunner().invoke(app, ["bench", "serve", "--model", "nope", "--url", server, "--duration", "0.1"])
    assert result.exit_code != 0 and "404" in str(result.exception)


def test_raw_timing_of_a_repository_model(tmp_path):
    from deepseek.cli.bench import measure_raw

    (tmp_path / "linear" / "1").mkdir(parents=True)
    (tmp_path / "linear" / "config.yaml").write_text(LINEAR_CONFIG)
    torch.jit.script(torch.nn.Linear(32, 10).eval()).save(str(tmp_path / "linear" / "1" / "model.pt"))
    raw = measure_raw(tmp_path, "linear", {}, 100, seconds=0.05)
    assert [r["batch"] for r in raw["batches"]] == [1, 4, 16, 64]
    assert raw["best_samples_per_s"] >= raw["batch1_samples_per_s"] > 0 and raw["gain_best_over_1"] >= 1
    with pytest.raises(FileNotFoundError):
        measure_raw(tmp_path, "nope", {}, 100)


def test_start_and_stop_server_reaps_its_whole_process_group(tmp_path):
    import sys

    port = free_port()
    # The shell leaves a background child in the server's process group, as LitServe's workers are left.
    command = ["sh", "-c", f"sleep 300 & exec {sys.executable} -m http.server {port} --bind 127.0.0.1"]
    proc = loadgen.start_server(command, f"http://127.0.0.1:{port}/", timeout_s=30, log_path=tmp_path / "log")
    members = loadgen._group_members(proc.pid)
    assert proc.pid in members and len(members) == 2
    assert loadgen.server_cpu_seconds(proc.pid) >= 0
    loadgen.stop_server(proc, grace_s=5)
    assert proc.poll() is not None and loadgen._group_members(proc.pid) == []
    with pytest.raises(RuntimeError, match="exited with code 3"):
        loadgen.start_server([sys.executable, "-c", "raise SystemExit(3)"], f"http://127.0.0.1:{port}/")
