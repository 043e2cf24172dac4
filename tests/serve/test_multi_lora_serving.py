"""Multi-LoRA serving through the real ``openai`` client: adapters from config.yaml, picked by the ``model`` field
("<model>:<adapter>"), listed by GET /v1/models; concurrent streams of different adapters share the engine's
batch and each equals its adapter served alone."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

import deepseek as ds
from deepseek.bench import streamload
from deepseek.cli.main import app
from deepseek.models.adapters import load_adapter
from deepseek.nn.lora import LoRAConfig
from deepseek.config import ConfigError
from deepseek.serve.backends.base import BackendError
from deepseek.serve.backends.deepseek_backend import DeepSeekBackend
from deepseek.serve.config import parse_serving_config
from deepseek.serve.manager import ModelManager
from deepseek.serve.repository import ModelRepository
from tests.generate.test_multi_lora import ATTENTION, base_model, make_adapter
from tests.serve.gated_model import running_server

PROMPTS = ["def add(a, b):", "hello world", "import torch", "x = 1\ny = ", "class Foo:", "the quick brown"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    tok = ds.byte_tokenizer()
    ds.save(base_model(), tok, root / "lm" / "1")
    adapters = {"alpha": make_adapter(root / "lm" / "alpha", LoRAConfig(r=4, alpha=8, target_modules=ATTENTION), 1),
                "beta": make_adapter(root / "lm" / "beta", LoRAConfig(r=2, target_modules=("attn.q", "attn.v")), 2)}
    (root / "lm" / "config.yaml").write_text(yaml.safe_dump({
        "backend": "deepseek", "precision": "fp32", "adapters": {"alpha": "alpha", "beta": str(adapters["beta"])},
        "generation": {"max_running": 4, "max_batched_tokens": 24, "prefill_chunk": 8, "max_queue": 64}}))
    manager = ModelManager(ModelRepository(root))
    with running_server(manager) as base:
        yield base, adapters


def alone(adapters, name, prompt, max_new_tokens):
    model = base_model()
    if name is not None:
        load_adapter(model, adapters[name])
    return ds.generate(model, ds.byte_tokenizer(), prompt, max_new_tokens=max_new_tokens).text


def test_models_lists_base_and_adapters(server):
    client = openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)
    models = client.models.list().data
    assert [m.id for m in models] == ["lm", "lm:alpha", "lm:beta"]
    assert [getattr(m, "parent", None) for m in models] == [None, "lm", "lm"]
    with pytest.raises(openai.NotFoundError, match="no adapter 'gamma'"):
        client.completions.create(model="lm:gamma", prompt="hi", max_tokens=2)


def test_concurrent_streams_of_different_adapters_equal_each_alone(server):
    base, adapters = server
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
    jobs = [(p, [None, "alpha", "beta"][i % 3]) for i, p in enumerate(PROMPTS)]
    texts: dict[int, str] = {}
    start = threading.Barrier(len(jobs))

    def stream(i, prompt, adapter):
        start.wait()
        model = "lm" if adapter is None else f"lm:{adapter}"
        chunks = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True)
        texts[i] = "".join(c.choices[0].text for c in chunks if c.choices)

    threads = [threading.Thread(target=stream, args=(i, p, a)) for i, (p, a) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    expected = {i: alone(adapters, a, p, 12) for i, (p, a) in enumerate(jobs)}
    assert texts == expected
    for i in (1, 2):  # the adapters change the text (else equality would prove nothing)
        assert expected[i] != alone(adapters, None, jobs[i][0], 12)

    # KServe generate takes the adapter as a parameter.
    out = httpx.post(f"{base}/v2/models/lm/generate",
                     json={"text_input": PROMPTS[0], "parameters": {"max_new_tokens": 12, "adapter": "beta"}},
                     timeout=60).json()
    assert out["text_output"] == alone(adapters, "beta", PROMPTS[0], 12)


def test_generation_metrics_per_adapter(server):
    base, _ = server
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
    client.completions.create(model="lm:alpha", prompt="hi", max_tokens=3, temperature=0)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(base + "/metrics").text)}

    def value(sample_name, **labels):
        return sum(s.value for f in families.values() for s in f.samples
                   if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("ds_generation_adapter_requests_total", model="lm", adapter="alpha", finish_reason="length") >= 1
    assert value("ds_generation_adapter_completion_tokens_total", model="lm", adapter="alpha") >= 3


def test_config_adapters_are_checked(tmp_path):
    assert parse_serving_config({"backend": "deepseek", "adapters": {"a-1.x": "dir"}}).adapters == {"a-1.x": "dir"}
    for bad, match in [({"backend": "deepseek", "adapters": {"a:b": "dir"}}, "must be letters"),
                       ({"backend": "deepseek", "adapters": {"a": ""}}, "needs a directory"),
                       ({"backend": "onnx", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}],
                         "outputs": [{"name": "y", "datatype": "FP32", "shape": [1]}], "adapters": {"a": "d"}},
                        "deepseek backend only")]:
        with pytest.raises(ConfigError, match=match):
            parse_serving_config(bad)
    ds.save(base_model(), ds.byte_tokenizer(), tmp_path / "lm" / "1")
    config = parse_serving_config({"backend": "deepseek", "adapters": {"gone": "missing"}})
    with pytest.raises(BackendError, match="missing is not a directory"):
        DeepSeekBackend("lm", 1, tmp_path / "lm" / "1", config)


def _kserve_stream_text(url: str, body: dict) -> str:
    with httpx.stream("POST", url, json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    return "".join(e["text_output"] for e in events)


def test_kserve_generate_with_an_adapter_equals_openai_with_model_colon_adapter(server):
    base, _ = server
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
    for adapter in ("alpha", "beta"):
        want = client.completions.create(model=f"lm:{adapter}", prompt=PROMPTS[3], max_tokens=10, temperature=0)
        want = want.choices[0].text
        params = {"max_new_tokens": 10, "temperature": 0}
        by_parameter = {"text_input": PROMPTS[3], "parameters": {**params, "adapter": adapter}}
        answer = httpx.post(f"{base}/v2/models/lm/generate", json=by_parameter, timeout=60).json()
        assert answer["text_output"] == want and answer["model_name"] == "lm"
        assert _kserve_stream_text(f"{base}/v2/models/lm/generate_stream", by_parameter) == want
        # The model name "lm:<adapter>" in the path, as OpenAI's model field, picks the same adapter.
        by_name = {"text_input": PROMPTS[3], "parameters": params}
        assert httpx.post(f"{base}/v2/models/lm:{adapter}/versions/1/generate", json=by_name,
                          timeout=60).json()["text_output"] == want
        assert _kserve_stream_text(f"{base}/v2/models/lm:{adapter}/generate_stream", by_name) == want
    base_text = httpx.post(f"{base}/v2/models/lm/generate", json={"text_input": PROMPTS[3], "parameters": params},
                           timeout=60).json()["text_output"]
    assert base_text != want  # the adapter changes the answer (else the equalities would prove nothing)

    for body, path, status, match in [
            ({"parameters": {"adapter": "gamma"}}, "lm", 404, "no adapter 'gamma'"),
            ({"parameters": {"adapter": ""}}, "lm", 400, "adapter must be"),
            ({"parameters": {"adapter": "beta"}}, "lm:alpha", 400, "named twice")]:
        r = httpx.post(f"{base}/v2/models/{path}/generate", json={"text_input": "hi", **body}, timeout=60)
        assert r.status_code == status and match in r.text, r.text


def test_stream_load_spreads_streams_over_adapters(server):
    base, _ = server
    prompts = streamload.stdlib_prompts(ds.byte_tokenizer(), 4, 12)
    mix = {name: streamload.completion_bodies(name, prompts, 4) for name in ("lm:alpha", "lm:beta", "lm")}
    result = streamload.run_stream_load(base, mix, concurrency=4, warmup_s=0, duration_s=1.5)
    assert result.errors == {} and list(result.by_group) == ["lm:alpha", "lm:beta", "lm"]
    assert [g.concurrency for g in result.by_group.values()] == [2, 1, 1]  # round-robin: stream 3 is alpha's
    assert all(g.requests > 0 and g.completion_tokens_mean == 4 for g in result.by_group.values())
    assert result.requests == sum(g.requests for g in result.by_group.values())
    assert result.output_tokens_per_s == pytest.approx(sum(g.output_tokens_per_s for g in result.by_group.values()))
    with pytest.raises(ValueError, match="cannot spread over 3 models"):
        streamload.run_stream_load(base, mix, concurrency=2, warmup_s=0, duration_s=0.1)


def test_ds_bench_serve_openai_adapter_mix(server, tmp_path):
    base, _ = server
    out = tmp_path / "mix.json"
    args = ["bench", "serve", "--openai", "--model", "lm", "--url", base, "--duration", "1", "--warmup", "0",
            "--prompt-tokens", "8", "--max-tokens", "3"]
    result = CliRunner().invoke(app, [*args, "--concurrency", "2", "--adapters", "alpha,beta", "--json", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert summary["adapters"] == ["alpha", "beta"]
    (total,) = summary["results"]
    assert total["errors"] == {} and set(total["by_group"]) == {"lm:alpha", "lm:beta"}
    assert all(g["requests"] > 0 for g in total["by_group"].values())
    assert "2 streams, lm:alpha: 1 of them" in result.output

    for extra, match in [(["--adapters", "alpha,gamma"], "no adapter 'gamma'"),
                         (["--adapters", "alpha,,beta"], "distinct, non-empty"),
                         (["--adapters", "alpha,beta", "--concurrency", "1"], "one stream per adapter")]:
        result = CliRunner().invoke(app, [*args, *extra])
        text = " ".join((result.output + str(result.exception)).replace("│", " ").split())  # rich wraps lines
        assert result.exit_code != 0 and match in text, result.output
