"""Multi-LoRA serving through the real ``openai`` client: adapters from config.yaml, picked by the ``model`` field
("<model>:<adapter>"), listed by GET /v1/models; concurrent streams of different adapters share the engine's
batch and each equals its adapter served alone."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import deepseek as ds
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
