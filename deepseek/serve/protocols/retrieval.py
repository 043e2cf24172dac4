"""``POST /v1/retrieve``: ranked chunks of a knowledge index served as a ``retrieval`` model.

    {"model": "kb", "query": "how do I decode JSON?", "k": 5, "mode": "hybrid",
     "filters": {"path": "*/json/*.py", "type": "py"}}               # or "queries": ["...", "..."]
    -> {"object": "list", "model": "kb", "mode": "hybrid", "k": 5,
        "data": [{"object": "retrieval", "index": 0, "query": "...",
                  "hits": [{"rank", "score", "id", "source", "type", "span", "span_unit", "title", "text",
                            "metadata"}, ...]}],
        "usage": {"queries": 1, "prompt_tokens": 9, "total_tokens": 9}}

A ``/v1`` route, next to ``/v1/embeddings``, rather than a KServe ``/v2/models/{m}/retrieve`` extension: the body
is JSON text in and JSON records out, not tensors, it names its model in the body as the OpenAI-shaped routes do,
it shares their error shape, their key rules and ``/v1/models``, and an OpenAI-style client reaches it with the
same base URL.

``k`` (default: the model's ``parameters.k``) lies in 1..``max_k``; ``mode`` is hybrid, dense or bm25 (default:
the model's); ``filters.path`` is a glob or a list of globs and ``filters.type`` a file type or a list of them
(:class:`deepseek.rag.retrieve.Retriever`). At most ``max_queries`` queries per request, none empty. The queries are
tokenized here and queued on the model's dynamic batcher (:func:`~deepseek.serve.protocols.openai_embeddings.embed`),
so the queries of concurrent requests are embedded in one call; then this request's FAISS and BM25 search runs in a
worker thread. The hits are those ``ds rag query`` and :class:`~deepseek.rag.retrieve.Retriever` give for the same
index, query, mode and filters.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from deepseek.rag.retrieve import MODES, RetrievalError, check_options
from deepseek.serve.errors import RequestError
from deepseek.serve.protocols.http_context import access_logged, log_access, read_inference_body, serving
from deepseek.serve.protocols.http_errors import OpenAIRoute
from deepseek.serve.protocols.openai_embeddings import embed, model_of_backend

FIELDS = {"model", "query", "queries", "k", "mode", "filters"}
FILTERS = {"path", "type"}

router = APIRouter(route_class=OpenAIRoute)


def parse_queries(body: dict) -> list[str]:
    """``query`` (one text) or ``queries`` (a list of texts), exactly one of them, no text empty or blank."""
    if ("query" in body) == ("queries" in body):
        raise RequestError("give either 'query' (a text) or 'queries' (a list of texts)", param="query")
    if "query" in body:
        field, queries = "query", body["query"]
        if not isinstance(queries, str):
            raise RequestError("'query' must be a string", param="query")
        queries = [queries]
    else:
        field, queries = "queries", body["queries"]
        if not isinstance(queries, list) or not queries or not all(isinstance(q, str) for q in queries):
            raise RequestError("'queries' must be a non-empty list of strings", param="queries")
    empty = next((i for i, q in enumerate(queries) if not q.strip()), None)
    if empty is not None:
        where = "'query'" if field == "query" else f"'queries[{empty}]'"
        raise RequestError(f"{where} is empty: a query needs words to search for", param=field)
    return queries


def _strings(value: Any, field: str) -> list[str]:
    """A filter's value: one string or a list of them."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
        raise RequestError(f"'filters.{field}' must be a non-empty string or a list of them", param="filters")
    return values


def parse_filters(value: Any) -> tuple[list[str], list[str]]:
    """``filters`` -> (path globs, file types); both empty when absent."""
    if value is None:
        return [], []
    if not isinstance(value, dict):
        raise RequestError("'filters' must be an object: {\"path\": glob(s), \"type\": file type(s)}", param="filters")
    unknown = sorted(set(value) - FILTERS)
    if unknown:
        raise RequestError(f"unknown filter(s) {', '.join(unknown)}; supported: path, type", param="filters")
    paths = _strings(value["path"], "path") if "path" in value else []
    types = _strings(value["type"], "type") if "type" in value else []
    return paths, types


def parse_k(value: Any, default: int, largest: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= largest:
        raise RequestError(f"'k' must be an integer in 1..{largest} (this model's max_k), got {value!r}", param="k")
    return value


@router.post("/v1/retrieve")
@access_logged("retrieve")
async def retrieve(request: Request):
    started = time.monotonic()
    ctx = serving(request)
    body = await read_inference_body(request, FIELDS)
    queries = parse_queries(body)
    paths, types = parse_filters(body.get("filters"))
    mv = model_of_backend(request, body.get("model"), "retrieval")
    backend = mv.backend
    if len(queries) > backend.max_queries:
        raise RequestError(f"'queries' holds {len(queries)} queries; model {mv.name!r} takes at most "
                           f"{backend.max_queries} per request (parameters.max_queries)", param="queries")
    k = parse_k(body.get("k"), backend.default_k, backend.max_k)
    mode = body.get("mode") if body.get("mode") is not None else backend.mode
    if mode not in MODES:
        raise RequestError(f"'mode' must be one of {', '.join(MODES)}, got {mode!r}", param="mode")
    try:
        check_options(mode, types)
    except RetrievalError as exc:
        raise RequestError(str(exc), param="filters") from None
    vectors, tokens = await embed(request, mv, queries)
    searched = time.monotonic()
    hits = await asyncio.to_thread(backend.search, queries, vectors, k, mode, paths, types)
    done = time.monotonic()
    ctx.metrics.observe_retrieval(mv.name, mv.version, mode, len(queries), done - started, done - searched)
    log_access(request, "retrieve", started, 200, batch_size=len(queries), tokens_in=tokens,
               compute_ms=round((done - searched) * 1000, 3))
    answer = {"object": "list", "model": body["model"], "mode": mode, "k": k,
              "data": [{"object": "retrieval", "index": i, "query": query, "hits": [h.to_dict() for h in ranked]}
                       for i, (query, ranked) in enumerate(zip(queries, hits))],
              "usage": {"queries": len(queries), "prompt_tokens": tokens, "total_tokens": tokens}}
    return Response(orjson.dumps(answer), media_type="application/json")
