"""A seeded mutation fuzzer over a valid request body of every JSON route, as a hostile client would try them.

Each case takes a valid body (KServe v2 infer on FP32 and INT64 models, the repository and management routes,
OpenAI completions and chat, streaming or not, KServe generate) and swaps one of its fields, at any depth, for a
value of another JSON type or an extreme one (an object where a string goes, ``true`` in an INT64 tensor,
2**63 - 1 tokens, ...), or drops it: every field of every body, each with a few seeded values; then some bodies
with two fields swapped at once. Whatever arrives, the server answers below 500 with a JSON error body
that has a message, and the same keep-alive connection then serves a valid request, unless the error answer
said ``Connection: close``. The same httpx client sends everything, and each answer's local port tells which
connection carried it.

Found this way (fixed): ``{"role": {}, "content": "hi"}`` in a chat message was a 500 (an unhashable dict
looked up in the role table) after which the connection was dropped unannounced; ``true`` in INT64 data was
read as 1; ``max_tokens`` of 2**63 - 1 was accepted and silently cut to the context.
"""

import copy
import json
import random

import pytest
import yaml

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

import deepseek as ds  # noqa: E402
from deepseek.serve.manager import ModelManager  # noqa: E402
from deepseek.serve.repository import ModelRepository  # noqa: E402

from .gated_model import GATE, model_config, running_server, write_model  # noqa: E402

KEY = "fuzz-key"
PER_FIELD = 3  # hostile values tried in each field of each valid body (seeded: the same every run)
RANDOM_PAIRS = 150
SEED = 17
DROP = object()  # "leave the field out"
LM_GENERATION = {"max_running": 4, "max_batched_tokens": 16, "prefill_chunk": 8, "max_queue": 64}


def _infer(datatype: str, data: list) -> dict:
    return {"id": "r1", "inputs": [{"name": "x", "datatype": datatype, "shape": [1, len(data)], "data": data}],
            "outputs": [{"name": "y", "parameters": {"binary_data": False}}], "parameters": {"priority": 1}}


# (method, path, valid body, headers): one entry per route that takes a JSON body
VALID = [
    ("POST", "/v2/models/m/infer", _infer("FP32", [1.0, 2.0]), {}),
    ("POST", "/v2/models/ids/infer", _infer("INT64", [10, 20, 30, 40]), {}),
    ("POST", "/v2/models/ids/versions/1/infer", _infer("INT64", [1, 2, 3, 4]), {}),
    ("POST", "/v2/repository/index", {"ready": True}, {}),
    ("POST", "/v2/repository/models/m/load", {"parameters": {}}, {"Authorization": f"Bearer {KEY}"}),
    ("POST", "/v2/repository/models/lm/adapters/a/load", {"path": "no-such-adapter"},
     {"Authorization": f"Bearer {KEY}"}),
    ("PUT", "/v2/models/m/routing", {"policy": "latest"}, {"Authorization": f"Bearer {KEY}"}),
    ("POST", "/v2/models/m/experiment/outcome", {"key": "u1", "metric": "click", "value": 1.0},
     {"Authorization": f"Bearer {KEY}"}),
    ("POST", "/v1/completions", {"model": "lm", "prompt": "def f(", "max_tokens": 2, "temperature": 0, "n": 1,
                                 "stop": ["\n"], "seed": 1, "logprobs": 1, "ignore_eos": True}, {}),
    ("POST", "/v1/completions", {"model": "lm", "prompt": ["a", "b"], "max_tokens": 2, "stream": True,
                                 "stream_options": {"include_usage": True}}, {}),
    ("POST", "/v1/chat/completions", {"model": "lm", "messages": [{"role": "system", "content": "be brief"},
                                                                  {"role": "user", "content": "hi"}],
                                      "max_tokens": 2, "temperature": 0.5, "top_p": 0.9, "logprobs": True,
                                      "top_logprobs": 2, "response_format": {"type": "text"}}, {}),
    ("POST", "/v1/chat/completions", {"model": "lm", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}]}], "max_completion_tokens": 2, "stream": True}, {}),
    ("POST", "/v2/models/lm/generate", {"text_input": "hi", "parameters": {"max_new_tokens": 2, "seed": 3}}, {}),
    ("POST", "/v2/models/lm/generate_stream", {"text_input": "hi", "parameters": {"max_new_tokens": 2}}, {}),
]

HOSTILE = [{}, [], None, True, False, 0, -1, 1.5, 2 ** 63 - 1, 2 ** 63, -(2 ** 63) - 1, 10 ** 30, 1e308, "",
           "hi", "x" * 300, [{}], {"a": {}}, [[[]]], ["hi", {}], [True], {"role": {}}, float("nan"), float("inf")]
LIVE_CHECK = ("POST", "/v2/models/m/infer", _infer("FP32", [3.0, 4.0]), {})


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    write_model(root, "m", config=model_config(max_batch_size=4, shape=[-1],
                                               dynamic_batching={"max_queue_delay_ms": 0, "priority_levels": 2}))
    ids_config = model_config(max_batch_size=4, shape=[4])
    ids_config["inputs"][0]["datatype"] = ids_config["outputs"][0]["datatype"] = "INT64"
    write_model(root, "ids", config=ids_config)
    ds.save(ds.MoETransformer(ds.preset("tiny")).eval(), ds.byte_tokenizer(), root / "lm" / "1")
    (root / "lm" / "config.yaml").write_text(yaml.safe_dump({"backend": "deepseek", "generation": LM_GENERATION}))
    GATE.reset()
    with running_server(ModelManager(ModelRepository(root)), api_key=KEY) as base, \
            httpx.Client(base_url=base, timeout=120) as http:
        yield http
    GATE.reset()


# -- the mutator ---------------------------------------------------------------------------------------------

def _paths(node, path=()):
    """Every (path) to a value inside ``node``: object keys and list indexes, at any depth."""
    yield path
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*path, i))


def replaced(body: dict, path: tuple, value) -> dict:
    """A copy of ``body`` with the field at ``path`` set to ``value`` (or dropped, for :data:`DROP`)."""
    body = copy.deepcopy(body)
    parent = body
    for step in path[:-1]:
        parent = parent[step]
    if value is DROP:
        if isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent.pop(path[-1])
    else:
        parent[path[-1]] = copy.deepcopy(value)
    return body


def cases():
    """Every field of every valid body, each swapped for ``PER_FIELD`` seeded hostile values and dropped once;
    then ``RANDOM_PAIRS`` bodies with two fields swapped at once."""
    rng = random.Random(SEED)
    for method, path, body, headers in VALID:
        for field in [p for p in _paths(body) if p]:
            for value in [*rng.sample(HOSTILE, PER_FIELD), DROP]:
                yield method, path, replaced(body, field, value), headers
    for i in range(RANDOM_PAIRS):
        method, path, body, headers = VALID[i % len(VALID)]
        for _ in range(2):
            fields = [p for p in _paths(body) if p]
            if fields:
                body = replaced(body, rng.choice(fields), rng.choice(HOSTILE))
        yield method, path, body, headers


def send(http, method: str, path: str, body, headers: dict) -> httpx.Response:
    content = json.dumps(body, allow_nan=True).encode()
    return http.request(method, path, content=content, headers={"Content-Type": "application/json", **headers})


def local_port(response: httpx.Response) -> int:
    """The client-side port of the connection that carried ``response``."""
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


def error_message(response: httpx.Response) -> str:
    error = response.json()["error"]  # KServe: a string; OpenAI: {"message", "type", "param", "code"}
    return error if isinstance(error, str) else error["message"]


# -- the tests -----------------------------------------------------------------------------------------------

def test_every_valid_body_is_served(client):
    for method, path, body, headers in VALID:
        r = send(client, method, path, body, headers)
        if path.endswith("/load") or path.endswith("/outcome"):  # model control "none"; no A/B test running
            assert r.status_code in (400, 404) and error_message(r), (path, r.text)
        else:
            assert r.status_code == 200, (path, r.text)


def test_mutated_bodies_never_answer_a_server_error_and_keep_the_connection(client):
    failures = []
    for method, path, body, headers in cases():
        r = send(client, method, path, body, headers)
        if r.status_code >= 500:
            failures.append((r.status_code, path, body, r.text[:200]))
            continue
        if r.status_code >= 400:
            assert error_message(r), (path, body, r.text)
        port = local_port(r)
        closes = r.headers.get("connection", "").lower() == "close"
        try:
            after = send(client, *LIVE_CHECK)
        except httpx.TransportError as exc:  # e.g. reset: the server dropped the connection without saying so
            raise AssertionError(f"the connection broke after {r.status_code} for {path} {body}: {exc!r}") from None
        assert after.status_code == 200, (path, body, after.text)
        if not closes:  # an answer that does not say "Connection: close" leaves the connection usable
            assert local_port(after) == port, ("the connection was dropped after", r.status_code, path, body)
    assert not failures, failures


@pytest.mark.parametrize("method, path, body, status, param", [
    ("POST", "/v1/chat/completions", {"model": "lm", "messages": [{"role": {}, "content": "hi"}]}, 400,
     "messages[0]"),
    ("POST", "/v1/chat/completions", {"model": "lm", "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 2 ** 63 - 1}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"model": "lm", "prompt": "hi", "max_tokens": 2 ** 63 - 1}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"model": "lm", "prompt": "hi", "max_tokens": 1024}, 400, "max_tokens"),
    ("POST", "/v2/models/lm/generate", {"text_input": "hi", "parameters": {"max_new_tokens": 2 ** 63 - 1}}, 400,
     "max_new_tokens"),
    ("POST", "/v2/models/ids/infer", _infer("INT64", [10, 20, True, 40]), 400, None),
    ("POST", "/v2/models/ids/infer", _infer("INT64", [10, 20, 30.5, 40]), 400, None),
    ("POST", "/v2/models/ids/infer", _infer("INT64", [10, 20, "30", 40]), 400, None),
    ("POST", "/v2/models/m/infer", _infer("FP32", [1.0, False]), 400, None),
    ("POST", "/v2/models/m/infer", {**_infer("FP32", [1.0, 2.0]), "id": 10 ** 30}, 400, None),
])
def test_type_confusion_found_by_fuzzing_is_a_400(client, method, path, body, status, param):
    r = send(client, method, path, body, {})
    assert r.status_code == status, r.text
    assert error_message(r)
    if param is not None:
        assert r.json()["error"]["param"] == param
    after = send(client, *LIVE_CHECK)
    assert after.status_code == 200 and local_port(after) == local_port(r)  # the same keep-alive connection


def test_a_body_over_the_limit_closes_the_connection_and_says_so(client):
    r = client.post("/v2/models/m/infer", content=b"{" + b" " * (1 << 20) + b"}")
    assert r.status_code == 413 and r.headers["connection"] == "close" and error_message(r)
    assert send(client, *LIVE_CHECK).status_code == 200  # the client opened a new connection, as told
