"""Serving LoRA adapters of a quickstart-shaped model (our adapter format): a served adapter answers the real
``openai`` client as local generation with the adapter applied does, ``ds serve MODEL_DIR --adapter NAME=DIR``
serves it, and the key-protected management API loads and unloads adapters at run time while the server keeps
serving."""

import json
import threading

import httpx
import openai
import pytest
import yaml

import deepseek as ds
from deepseek.finetune.config import load_finetune_config
from deepseek.finetune.run import finetune
from deepseek.models.adapters import load_adapter
from deepseek.nn.lora import LoRAConfig
from deepseek.nn.multi_lora import multi_lora_modules
from deepseek.serve.backends.deepseek_backend import DeepSeekBackend
from deepseek.serve.config import ServingConfig
from deepseek.serve.protocols.openai_api import chat_prompt
from tests.finetune.test_run import CHATS, overrides
from tests.models.quickstart_shaped import (
    quickstart_shaped_model,
    save_quickstart_shaped,
)
from tests.models.random_adapter import save_random_adapter
from tests.serve.test_cli_serve import free_port, start_server, stop, wait_ready

KEY = "s3cret"
MESSAGES = [{"role": "user", "content": "add 1 and 2"}]
PROMPT = "def f(x):"


def random_adapter(folder, targets, seed):
    return save_random_adapter(quickstart_shaped_model(), folder, LoRAConfig(r=4, alpha=8, target_modules=targets),
                               seed, 0.5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The base ("base"), an adapter fine-tuned through finetune() (served with --adapter as "sft"), and two more
    for run-time loading: "loud" (attention + shared expert, random) and one of the routed experts (refused)."""
    folder = tmp_path_factory.mktemp("adapters")
    base = save_quickstart_shaped(folder / "base")
    data = folder / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in CHATS))
    lora = "lora={r: 4, alpha: 8, target_modules: [attn.q, attn.k, attn.v, attn.o, ffn.shared.up]}"
    finetune(load_finetune_config(None, overrides(base, data, folder / "run", lora, "max_steps=3",
                                                  "optimizer.lr=5e-2")))
    adapters = {"sft": folder / "run" / "adapter",
                "loud": random_adapter(folder / "loud", ("attn.q", "attn.v", "ffn.shared.down"), 1),
                "experts": random_adapter(folder / "experts", ("ffn.experts",), 2)}
    return base, adapters


@pytest.fixture(scope="module")
def server(setup, tmp_path_factory):
    """The base as model "base" with "sft" from its config.yaml (what ``--adapter`` writes, plus fp32: local
    generation runs in fp32, and precision auto may pick bf16 on a CPU that decodes faster in it)."""
    base, adapters = setup
    root = tmp_path_factory.mktemp("repo")
    (root / "base").mkdir()
    (root / "base" / "1").symlink_to(base, target_is_directory=True)
    (root / "base" / "config.yaml").write_text(yaml.safe_dump({
        "backend": "deepseek", "precision": "fp32", "adapters": {"sft": str(adapters["sft"])}}))
    with ds.serve(root, port=free_port(), block=False, api_key=KEY) as s:
        yield s.url, setup


def local(base, adapter, prompt, max_new_tokens=16, **params):
    model, tokenizer = ds.load(base)
    if adapter is not None:
        load_adapter(model, adapter)
    return ds.generate(model.eval(), tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=0, **params).text


def local_chat(base, adapter, messages, max_new_tokens=16):
    _, tokenizer = ds.load(base)
    text, stop_ids, stops = chat_prompt(tokenizer, messages)
    return local(base, adapter, text, max_new_tokens, stop=stops, stop_token_ids=stop_ids)


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def manage(url, action, adapter, key=KEY, **body):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/v2/repository/models/base/adapters/{adapter}/{action}", json=body, headers=headers,
                      timeout=60)


def test_served_adapter_answers_the_openai_client_as_local_generation(server):
    url, (base, adapters) = server
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["base", "base:sft"]
    reply = c.chat.completions.create(model="base:sft", messages=MESSAGES, max_tokens=16, temperature=0)
    assert reply.choices[0].message.content == local_chat(base, adapters["sft"], MESSAGES)
    plain = c.chat.completions.create(model="base", messages=MESSAGES, max_tokens=16, temperature=0)
    assert plain.choices[0].message.content == local_chat(base, None, MESSAGES)
    assert reply.choices[0].message.content != plain.choices[0].message.content  # the fine-tune changed the reply


def test_management_api_loads_and_unloads_adapters_at_run_time(server):
    url, (base, adapters) = server
    c = client(url)
    assert manage(url, "load", "loud", key=None, path=str(adapters["loud"])).status_code == 401
    assert manage(url, "load", "loud", key="wrong", path=str(adapters["loud"])).status_code == 401

    # A stream of "sft" runs while "loud" is loaded: its slot keeps its weights, its text equals local generation.
    first_chunk, texts = threading.Event(), []

    def stream():
        for chunk in c.completions.create(model="base:sft", prompt=PROMPT, max_tokens=40, temperature=0, stream=True):
            texts.append(chunk.choices[0].text if chunk.choices else "")
            first_chunk.set()

    thread = threading.Thread(target=stream)
    thread.start()
    first_chunk.wait(120)
    loaded = manage(url, "load", "loud", path=str(adapters["loud"]))
    assert loaded.status_code == 200, loaded.text
    assert loaded.json() == {"model": "base", "adapter": "loud", "versions": [1]}
    thread.join(120)
    assert "".join(texts) == local(base, adapters["sft"], PROMPT, 40)

    assert [m.id for m in c.models.list().data] == ["base", "base:loud", "base:sft"]
    loud = c.completions.create(model="base:loud", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    assert loud == local(base, adapters["loud"], PROMPT, 12) != local(base, None, PROMPT, 12)

    assert manage(url, "unload", "loud").status_code == 200
    with pytest.raises(openai.NotFoundError, match="no adapter 'loud'"):
        c.completions.create(model="base:loud", prompt=PROMPT, max_tokens=2)
    assert manage(url, "unload", "loud").status_code == 404
    # Loaded again (into the freed slot), next to "sft", which still answers as before.
    assert manage(url, "load", "loud", path=str(adapters["loud"])).status_code == 200
    again = c.completions.create(model="base:loud", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    assert again == loud
    sft = c.completions.create(model="base:sft", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    assert sft == local(base, adapters["sft"], PROMPT, 12)


def test_bad_adapter_loads_are_refused_and_the_server_keeps_serving(server, tmp_path):
    url, (base, adapters) = server
    for path, status, message in [
            (tmp_path / "absent", 400, "is not a directory"),
            (tmp_path, 400, "adapter_config.json is missing"),
            (adapters["experts"], 400, "not the head or routed experts")]:
        answer = manage(url, "load", "bad", path=str(path))
        assert answer.status_code == status and message in answer.text, answer.text
    assert manage(url, "load", "bad").status_code == 400  # no path
    assert manage(url, "load", "bad:name", path=str(adapters["loud"])).status_code == 400
    assert httpx.post(f"{url}/v2/repository/models/nope/adapters/a/load", json={"path": str(adapters["loud"])},
                      headers={"X-API-Key": KEY}, timeout=60).status_code == 404
    assert "base:bad" not in [m.id for m in client(url).models.list().data]
    reply = client(url).completions.create(model="base:sft", prompt=PROMPT, max_tokens=12, temperature=0)
    assert reply.choices[0].text == local(base, adapters["sft"], PROMPT, 12)


def test_ds_serve_cli_takes_adapters(setup, tmp_path):
    base, adapters = setup
    port = free_port()
    server = start_server(str(base), "--http-port", str(port), "--no-grpc", "--adapter", f"sft={adapters['sft']}")
    try:
        wait_ready(server, port)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"]
        assert [m["id"] for m in models] == ["base", "base:sft"]
        reply = client(f"http://127.0.0.1:{port}").chat.completions.create(model="base:sft", messages=MESSAGES,
                                                                          max_tokens=4, temperature=0)
        assert reply.usage.completion_tokens >= 1
    finally:
        stop(server)
    bad = start_server(str(base), "--adapter", "sft")
    _, err = bad.communicate(timeout=60)
    assert bad.returncode != 0 and "expected NAME=DIR" in err and "Traceback" not in err


def test_backend_changes_adapters_before_and_after_its_engine_starts(setup):
    base, adapters = setup
    backend = DeepSeekBackend("base", 1, base, ServingConfig(backend="deepseek", precision="fp32"))
    try:
        backend.load_adapter("loud", adapters["loud"])  # no engine yet: applied at once
        assert backend.adapters == ("loud",)
        engine = backend.engine()
        assert engine.adapters == {"loud": 0}
        deltas = []
        request = engine.submit(PROMPT, {"max_new_tokens": 12, "temperature": 0}, adapter="loud",
                                on_event=lambda event: deltas.append(event.delta))
        assert request.done.wait(120)
        assert "".join(deltas) == local(base, adapters["loud"], PROMPT, 12)
        backend.unload_adapter("loud")  # through the running engine
        assert backend.adapters == () and engine.adapters == {}
        with pytest.raises(ValueError, match="unknown adapter 'loud'"):
            engine.submit(PROMPT, adapter="loud")
        with pytest.raises(KeyError, match="no adapter 'loud'"):
            backend.unload_adapter("loud")
        assert not multi_lora_modules(backend.model)  # no slot left in use: the layers are plain again
    finally:
        backend.close()
