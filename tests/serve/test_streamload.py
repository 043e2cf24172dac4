"""The streaming load generator and ``ds bench serve --openai`` against a real server (no timing assertions)."""

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

import deepseek as ds
from deepseek.cli.main import app
from deepseek.generate.threads import release_openmp_pool
from deepseek.bench import streamload
from deepseek.serve.manager import ModelManager
from deepseek.serve.repository import ModelRepository

from .gated_model import free_port, running_server

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def lm_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    torch.manual_seed(0)
    ds.save(ds.MoETransformer(ds.preset("tiny")).eval(), ds.byte_tokenizer(), root / "lm" / "1")
    (root / "lm" / "config.yaml").write_text(yaml.safe_dump({"backend": "deepseek", "generation": {"max_running": 4}}))
    return root


@pytest.fixture(scope="module")
def server(lm_repo):
    with running_server(ModelManager(ModelRepository(lm_repo))) as base:
        yield base


def test_stdlib_prompts_have_the_asked_length():
    tok = ds.byte_tokenizer()
    prompts = streamload.stdlib_prompts(tok, n=5, prompt_tokens=40, seed=1)
    assert len(prompts) == 5 and len(set(prompts)) == 5
    assert all(len(tok.encode(p, add_special_tokens=False).ids) == 40 for p in prompts)
    assert streamload.stdlib_prompts(tok, n=5, prompt_tokens=40, seed=1) == prompts  # seeded


# Loads without warm-up: every stream's first request is sent inside the window, so each load counts at least one
# request per stream however slow a busy host makes them (with a warm-up, none might be sent inside a short window).
def test_closed_loop_streams_count_tokens_and_order_latencies(server):
    bodies = streamload.completion_bodies("lm", streamload.stdlib_prompts(ds.byte_tokenizer(), 8, 16), MAX_TOKENS)
    result = streamload.run_stream_load(server, bodies, concurrency=3, warmup_s=0, duration_s=1.5)
    assert result.errors == {}
    assert result.requests > 0 and result.output_tokens_per_s > 0 and result.request_throughput > 0
    assert result.completion_tokens_mean == MAX_TOKENS  # ignore_eos: every request runs to max_tokens
    assert result.prompt_tokens_mean == 16
    assert 0 < result.ttft_p50_ms <= result.ttft_p99_ms <= result.e2e_p99_ms
    assert result.tpot_p50_ms <= result.tpot_p99_ms and result.e2e_p50_ms <= result.e2e_p99_ms


def test_errors_are_counted_by_status(server):
    bodies = streamload.completion_bodies("no-such-model", ["x"], MAX_TOKENS)
    result = streamload.run_stream_load(server, bodies, concurrency=1, warmup_s=0.0, duration_s=0.5)
    assert result.requests == 0 and set(result.errors) == {"404"}


def test_connection_refused_is_an_error():
    result = streamload.run_stream_load(f"http://127.0.0.1:{free_port()}", [b"{}"], concurrency=1, warmup_s=0.0,
                                        duration_s=0.3)
    assert result.requests == 0 and result.error_count > 0


def test_summary_counts_tokens_arriving_inside_the_window():
    # One request sent during the warm-up, half of whose tokens arrive inside the window [10, 20).
    early = streamload.StreamRecord(sent=8.0, chunk_times=[9.0, 9.5, 10.5, 11.0], done=11.0, prompt_tokens=3,
                                    completion_tokens=8)
    inside = streamload.StreamRecord(sent=12.0, chunk_times=[12.5, 13.0, 13.5], done=13.6, prompt_tokens=3,
                                     completion_tokens=3)
    cpu = {"wall0": 10.0, "wall1": 20.0, "client0": 0.0, "client1": 1.0}
    result = streamload.summarize([early, inside], {}, concurrency=2, start=10.0, end=20.0, cpu=cpu, server=False)
    assert result.requests == 1  # latencies: only what was sent inside the window
    assert result.output_tokens_per_s == pytest.approx((4 + 3) / 10)  # 2 chunks x 2 tokens + 3
    assert result.request_throughput == pytest.approx(2 / 10)  # both streams ended inside
    assert result.ttft_p50_ms == pytest.approx(500) and result.tpot_p50_ms == pytest.approx(500)
    assert result.itl_p99_ms == pytest.approx(500)


def test_ds_bench_serve_openai_starts_a_server_and_writes_json(lm_repo, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "serve", "--openai", "--model", "lm", "--model-repository",
                                      str(lm_repo), "--concurrency", "1,2", "--duration", "1.5", "--warmup", "0",
                                      "--prompt-tokens", "12", "--max-tokens", str(MAX_TOKENS), "--json", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert [r["concurrency"] for r in summary["results"]] == [1, 2]
    assert all(r["errors"] == {} and r["completion_tokens_mean"] == MAX_TOKENS for r in summary["results"]), summary
    assert all(r["server_cpu_cores"] is not None for r in summary["results"])
    assert set(summary["scaling_over_one_stream"]) == {"2"}
    assert "TTFT" in result.output and "2 streams:" in result.output


def test_ds_bench_serve_openai_usage_errors(server):
    result = CliRunner().invoke(app, ["bench", "serve", "--openai", "--model", "lm", "--url", server, "--rate", "5"])
    assert result.exit_code != 0 and "not supported with --openai" in result.output
    result = CliRunner().invoke(app, ["bench", "serve", "--openai", "--model", "nope", "--url", server,
                                      "--duration", "0.1"])
    assert result.exit_code != 0 and "404" in str(result.exception)


def test_release_openmp_pool_keeps_torch_working():
    torch.ones(256, 256) @ torch.ones(256, 256)  # gives this thread a pool, when threads > 1
    release_openmp_pool()
    assert torch.equal(torch.ones(64, 64) @ torch.ones(64, 64), torch.full((64, 64), 64.0))
