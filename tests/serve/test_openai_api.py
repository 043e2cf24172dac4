"""OpenAI-compatible API and KServe generate on a real server, driven by the official ``openai`` client."""

import asyncio
import json
import threading

import httpx
import openai
import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

import deepseek as ds
from deepseek.data.tokenizer import train_tokenizer
from deepseek.generate import SamplingParams
from deepseek.serve.manager import ModelManager
from deepseek.serve.protocols.common import AccessLog
from deepseek.serve.repository import ModelRepository
from tests.generate.reference import assert_follows_hand_sampling, full_forward_logits
from tests.serve.gated_model import running_server, wait_for, write_model

GENERATION = {"max_running": 4, "max_batched_tokens": 24, "prefill_chunk": 8, "max_queue": 64}


def make_lm(root, name, tokenizer, generation=None, seed=0):
    cfg = ds.preset("tiny")
    cfg.vocab_size = tokenizer.get_vocab_size()
    torch.manual_seed(seed)
    model = ds.MoETransformer(cfg).eval()
    ds.save(model, tokenizer, root / name / "1")
    (root / name / "config.yaml").write_text(yaml.safe_dump({"backend": "deepseek",
                                                             "generation": generation or GENERATION}))
    return model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    byte_tok = ds.byte_tokenizer()
    chat_tok = train_tokenizer(["def f(x):\n    return x + 1\n" * 20, "hello world, hello chat\n" * 20], vocab_size=300)
    models = {"lm": (make_lm(root, "lm", byte_tok), byte_tok),
              "chat": (make_lm(root, "chat", chat_tok, seed=1), chat_tok)}
    make_lm(root, "tight", byte_tok, {"max_running": 1, "max_batched_tokens": 8, "prefill_chunk": 4, "max_queue": 1})
    write_model(root, "tensor")  # a KServe tensor model: not a language model
    manager = ModelManager(ModelRepository(root))
    with running_server(manager, access_log=AccessLog(root / "access.jsonl")) as base:
        yield base, manager, models


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def reference(models, name, prompt, **params):
    model, tok = models[name]
    return ds.generate(model, tok, prompt, **params)


def test_models_lists_language_models_only(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["chat", "lm", "tight"]


def test_completion_equals_the_engine_and_counts_usage(server, client):
    _, _, models = server
    out = client.completions.create(model="lm", prompt="def add(a, b):", max_tokens=12, temperature=0)
    ref = reference(models, "lm", "def add(a, b):", max_new_tokens=12)
    choice = out.choices[0]
    assert choice.text == ref.text and choice.finish_reason == ref.finish_reason
    assert out.usage.prompt_tokens == ref.prompt_tokens
    assert out.usage.completion_tokens == ref.completion_tokens
    assert out.object == "text_completion" and out.model == "lm"
    versioned = client.completions.create(model="lm/1", prompt="def add(a, b):", max_tokens=12, temperature=0)
    assert versioned.choices[0].text == choice.text


def test_streaming_with_usage_equals_the_whole_answer(client):
    whole = client.completions.create(model="lm", prompt="import os", max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model="lm", prompt="import os", max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def test_stop_strings_seeds_n_and_logprobs(server, client):
    _, _, models = server
    ref = reference(models, "lm", "x = [", max_new_tokens=30, ignore_eos=True)
    stop = ref.text[3:5]
    out = client.completions.create(model="lm", prompt="x = [", max_tokens=30, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == ref.text[: ref.text.index(stop)] and out.choices[0].finish_reason == "stop"

    sampled = [client.completions.create(model="lm", prompt="def", max_tokens=16, temperature=1.0, seed=42, n=2)
               for _ in range(2)]
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]
    assert len(sampled[0].choices) == 2 and sampled[0].usage.completion_tokens > 0

    lp = client.completions.create(model="lm", prompt="def", max_tokens=4, temperature=0, logprobs=2).choices[0]
    assert len(lp.logprobs.token_logprobs) == len(lp.logprobs.tokens) == len(lp.logprobs.top_logprobs)
    assert all(v <= 0 for v in lp.logprobs.token_logprobs) and all(len(t) <= 2 for t in lp.logprobs.top_logprobs)


def test_n_sampled_choices_differ(client):
    for seed in (42, None):  # seeded choices get seeds 42, 43; unseeded ones their own random draws
        out = client.completions.create(model="lm", prompt="def", max_tokens=16, temperature=1.0, seed=seed, n=2,
                                        extra_body={"ignore_eos": True})
        assert len(out.choices) == 2 and out.choices[0].text != out.choices[1].text


def test_logprobs_and_openai_penalties_against_a_full_forward(server, client):
    # The API's logprobs are log_softmax of a full forward (no cache) of the sequence it produced, and its tokens
    # are drawn by hand from the distribution temperature, top_p and the presence/frequency penalties define.
    _, manager, models = server
    model, tok = models["lm"]
    options = dict(temperature=0.7, top_p=0.9, presence_penalty=0.5, frequency_penalty=1.5, seed=5)
    choice = client.completions.create(model="lm", prompt="def", max_tokens=10, logprobs=3,
                                       extra_body={"ignore_eos": True}, **options).choices[0]
    # The ids behind the API's text: the same seeded request straight to the server's engine (batch-independent).
    params = SamplingParams(max_new_tokens=10, logprobs=3, ignore_eos=True, **options)
    request = _engine(manager, "lm").submit("def", params)
    assert request.done.wait(60)
    ids = request.token_ids
    raw = full_forward_logits(model, request.prompt_ids, ids, tok.get_vocab_size())
    log_probs = raw.log_softmax(-1)
    assert choice.logprobs.tokens == [tok.decode([i], skip_special_tokens=False) for i in ids]
    assert choice.logprobs.token_logprobs == pytest.approx([float(log_probs[i, t]) for i, t in enumerate(ids)],
                                                           abs=1e-4)
    for i, top in enumerate(choice.logprobs.top_logprobs):
        values, top_ids = log_probs[i].topk(3)
        # keyed by token text, as the API does (byte tokens that are no UTF-8 alone share a text: the last one stays)
        expected = {tok.decode([t], skip_special_tokens=False): v for t, v in zip(top_ids.tolist(), values.tolist())}
        assert top.keys() == expected.keys() and list(top.values()) == pytest.approx(list(expected.values()), abs=1e-4)
    assert_follows_hand_sampling(raw, request.prompt_ids, ids, params,
                                 dict(temperature=1.0, top_p=1.0, presence_penalty=0.0, frequency_penalty=0.0))


def test_chat_uses_the_tokenizers_template(server, client):
    _, _, models = server
    model, tok = models["chat"]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    out = client.chat.completions.create(model="chat", messages=messages, max_tokens=15, temperature=0)
    prompt = "<|system|>be brief<|end|><|user|>hello<|end|><|assistant|>"
    ref = ds.generate(model, tok, prompt, max_new_tokens=15, stop_token_ids=[tok.token_to_id("<|end|>")])
    assert out.choices[0].message.content == ref.text and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == ref.prompt_tokens

    stream = client.chat.completions.create(model="chat", messages=messages, max_tokens=15, temperature=0,
                                            stream=True, stream_options={"include_usage": True}, logprobs=True,
                                            top_logprobs=1)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.total_tokens == out.usage.total_tokens
    # The byte tokenizer has no role tokens: a plain transcript, still a chat answer.
    plain = client.chat.completions.create(model="lm", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                           temperature=0)
    assert plain.choices[0].message.content == reference(models, "lm", "User: hi\nAssistant:", max_new_tokens=5,
                                                         stop=["\nUser:", "\nSystem:"]).text


def test_32_concurrent_streams_equal_their_single_outputs(server):
    base, _, models = server
    prompts = [f"def f{i}(x):\n    return x * {i}" for i in range(32)]

    async def main():
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)

        async def one(prompt):
            stream = await client.completions.create(model="lm", prompt=prompt, max_tokens=10, temperature=0,
                                                     stream=True, extra_body={"ignore_eos": True})
            return "".join([c.choices[0].text async for c in stream if c.choices])

        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await client.close()

    texts = asyncio.run(main())
    for prompt, text in zip(prompts, texts):
        assert text == reference(models, "lm", prompt, max_new_tokens=10, ignore_eos=True).text


def _engine(manager, name):
    return manager.get(name).backend.engine()


def test_disconnect_frees_the_slot(server, client):
    _, manager, _ = server
    engine = _engine(manager, "lm")
    stream = client.completions.create(model="lm", prompt="def", max_tokens=1000, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    assert engine.stats().running == 1
    stream.close()
    wait_for(lambda: engine.stats().running == 0, "the disconnected stream's slot to be freed")
    assert engine.cache.used_tokens() == 0


def test_queue_full_is_429_and_the_server_keeps_serving(server):
    base, manager, _ = server
    engine = _engine(manager, "tight")
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
    running = client.completions.create(model="tight", prompt="a", max_tokens=1000, stream=True, temperature=0,
                                        extra_body={"ignore_eos": True})
    next(iter(running))
    waiting = threading.Thread(target=lambda: client.completions.create(model="tight", prompt="b", max_tokens=2))
    waiting.start()
    wait_for(lambda: engine.stats().waiting == 1, "a request waiting")
    with pytest.raises(openai.RateLimitError) as exc:
        client.completions.create(model="tight", prompt="c", max_tokens=2)
    assert exc.value.response.headers["retry-after"] == "1"
    assert exc.value.body["type"] == "rate_limit_error"
    running.close()
    waiting.join(120)
    assert client.completions.create(model="tight", prompt="d", max_tokens=2).choices[0].finish_reason


def test_a_failing_engine_answers_503_and_ends_streams_with_an_error(tmp_path):
    """The model raises inside the engine thread: no request hangs, the stream says why, the server keeps serving,
    the version reports itself unavailable, and a load request brings it back."""
    make_lm(tmp_path, "lm", ds.byte_tokenizer())
    manager = ModelManager(ModelRepository(tmp_path), control_mode="explicit", startup_models=["lm"])
    with running_server(manager, api_key="k") as base:
        engine = _engine(manager, "lm")
        fail, forward = threading.Event(), engine.model.forward

        def forward_or_fail(*args, **kwargs):  # a fault injected into the served model
            if fail.is_set():
                raise RuntimeError("injected fault")
            return forward(*args, **kwargs)

        engine.model.forward = forward_or_fail
        with httpx.Client(base_url=base, timeout=120) as http:
            body = {"model": "lm", "prompt": "def", "max_tokens": 200, "ignore_eos": True, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as stream:
                lines = stream.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))  # the first token is out
                fail.set()
                rest = [line for line in lines if line.startswith("data: ")]
            assert "injected fault" in rest[-1] and '"type":"server_error"' in rest[-1] and "[DONE]" not in rest[-1]
            answer = http.post("/v1/completions", json={"model": "lm", "prompt": "def", "max_tokens": 4})
            assert answer.status_code == 503 and "injected fault" in answer.json()["error"]["message"]
            assert http.get("/v2/health/live").status_code == 200
            assert http.get("/v2/models/lm/ready").status_code == 503
            row = next(r for r in http.post("/v2/repository/index", json={}).json() if r["name"] == "lm")
            assert row["state"] == "UNAVAILABLE" and "injected fault" in row["reason"]
            assert http.post("/v2/repository/models/lm/load", json={},
                             headers={"Authorization": "Bearer k"}).status_code == 200
            assert http.get("/v2/models/lm/ready").status_code == 200
            exactly_4 = {"model": "lm", "prompt": "def", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
            again = http.post("/v1/completions", json=exactly_4)
            assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "x"}, 400, "model"),
    ({"model": "lm", "prompt": "x", "temperature": 9}, 400, "temperature"),
    ({"model": "lm", "prompt": "x", "bogus": 1}, 400, "bogus"),
    ({"model": "lm", "prompt": []}, 400, "prompt"),
    ({"model": "lm", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "lm", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "lm", "prompt": "x" * 5000}, 400, "prompt"),
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"model": "tensor", "prompt": "x"}, 400, "model"),
    ({"model": "lm/9", "prompt": "x"}, 404, "model"),
])
def test_malformed_requests_get_openai_errors(server, body, status, param):
    r = httpx.post(server[0] + "/v1/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_bad_json_and_bad_chat_messages(server, client):
    r = httpx.post(server[0] + "/v1/chat/completions", content=b"{not json", timeout=60)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="lm", messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="lm", messages=[])


def test_kserve_generate_and_generate_stream(server):
    base, _, models = server
    ref = reference(models, "lm", "class A:", max_new_tokens=8)
    r = httpx.post(base + "/v2/models/lm/generate", json={"text_input": "class A:", "parameters": {"max_new_tokens": 8}},
                   timeout=60)
    assert r.status_code == 200 and r.json()["text_output"] == ref.text and r.json()["model_version"] == "1"
    with httpx.stream("POST", base + "/v2/models/lm/versions/1/generate_stream",
                      json={"text_input": "class A:", "parameters": {"max_new_tokens": 8}}, timeout=60) as s:
        lines = [line for line in s.iter_lines() if line.startswith("data: ")]
    import json
    assert "".join(json.loads(line[6:])["text_output"] for line in lines) == ref.text
    bad = httpx.post(base + "/v2/models/lm/generate", json={"parameters": {}}, timeout=60)
    assert bad.status_code == 400


def test_generation_metrics(server, client):
    client.completions.create(model="lm", prompt="print(", max_tokens=3, temperature=0)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(server[0] + "/metrics").text)}
    lm = {"model": "lm", "version": "1"}

    def value(family, sample_name, **labels):
        return sum(s.value for s in families[family].samples
                   if s.name == sample_name and all(s.labels.get(k) == v for k, v in {**lm, **labels}.items()))

    assert value("ds_generation_time_to_first_token_seconds", "ds_generation_time_to_first_token_seconds_count") >= 1
    assert value("ds_generation_e2e_latency_seconds", "ds_generation_e2e_latency_seconds_count") >= 1
    assert value("ds_generation_inter_token_latency_seconds", "ds_generation_inter_token_latency_seconds_count") >= 1
    assert value("ds_generation_completion_tokens", "ds_generation_completion_tokens_total") >= 3
    assert value("ds_generation_prompt_tokens", "ds_generation_prompt_tokens_total") >= 6
    assert value("ds_generation_requests", "ds_generation_requests_total", finish_reason="length") >= 1
    assert value("ds_generation_max_running_sequences", "ds_generation_max_running_sequences") == 4
    assert 0 <= value("ds_generation_kv_cache_utilization", "ds_generation_kv_cache_utilization") <= 1
    # what precision the model runs in, and why (precision: auto picks what decodes fastest on this machine)
    from deepseek.hardware import choose_precision, hardware_profile
    expected = choose_precision("auto", hardware_profile(), "decode")
    info = [smp for smp in families["ds_model_precision_info"].samples if smp.labels["model"] == "lm"]
    assert len(info) == 1 and info[0].value == 1
    assert info[0].labels["precision"] == expected.precision and info[0].labels["reason"].startswith("auto: ")


def test_access_log_lines_carry_route_adapter_tokens_ttft_and_client(server, client):
    base, manager, _ = server
    client.completions.create(model="lm", prompt="import os", max_tokens=5, temperature=0, user="alice")
    client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hello"}], max_tokens=4,
                                   temperature=0, extra_headers={"X-User-Id": "bob"})
    assert httpx.post(base + "/v2/models/lm/generate", json={"text_input": "ab", "parameters": {"max_new_tokens": 3}},
                      timeout=60).status_code == 200
    assert httpx.post(base + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=60).status_code == 404
    list(client.completions.create(model="lm", prompt="stream me", max_tokens=4, temperature=0, stream=True,
                                   user="dave"))
    log = manager.repository.root / "access.jsonl"
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    by_route = {}
    for line in lines:
        by_route.setdefault(line["route"], []).append(line)
    done = next(e for e in by_route["openai/completions"] if e["client"] == "alice")
    assert (done["model"], done["version"], done["status"], done["tokens_out"]) == ("lm", 1, 200, 5)
    assert done["tokens_in"] == len("import os") and done["batch_size"] == 1 and done["adapter"] is None
    assert 0 < done["ttft_ms"] <= done["total_ms"] and "time" in done and "variant" in done
    chat = next(e for e in by_route["openai/chat"] if e["client"] == "bob")
    assert chat["model"] == "chat" and chat["status"] == 200 and chat["tokens_out"] >= 1 and chat["ttft_ms"] > 0
    generated = by_route["v2/generate"][-1]
    assert generated["model"] == "lm" and generated["tokens_out"] == 3 and generated["client"] == "127.0.0.1"
    streamed = next(e for e in by_route["openai/completions"] if e["client"] == "dave")  # logged at the stream's end
    assert streamed["status"] == 200 and streamed["tokens_out"] == 4 and 0 < streamed["ttft_ms"] <= streamed["total_ms"]
    refused = next(e for e in by_route["openai/completions"] if e["status"] == 404)
    assert refused["model"] == "nope" and refused["total_ms"] >= 0
