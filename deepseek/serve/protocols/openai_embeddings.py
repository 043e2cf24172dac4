"""OpenAI's ``POST /v1/embeddings`` for the repository's embedding models (``backend: embedding``).

    {"model": "minilm", "input": ["a text", "another"], "encoding_format": "float"}
    -> {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [...]}, ...],
        "model": "minilm", "usage": {"prompt_tokens": 12, "total_tokens": 12}}

``model`` is a name or ``name/version`` (the routing policy picks the version otherwise, as for inference).
``input`` is a string or a list of up to 2048 non-empty strings; a text longer than the model's ``max_tokens``
(256 word pieces for all-MiniLM-L6-v2) is truncated there, as sentence-transformers does, and ``usage`` counts
the tokens actually embedded. Token-id arrays are refused: clients such as LangChain's ``OpenAIEmbeddings`` send
tiktoken ids, which are not this model's word-piece ids. ``encoding_format`` ``base64`` is the raw little-endian
float32 bytes the openai SDK decodes (its default); ``dimensions`` must equal the model's (no truncation).

The texts are tokenized here and their ids queued on the model's dynamic batcher, so concurrent requests share
one encode call; a request of more texts than the model's ``max_batch_size`` is queued in pieces of that size. A
client that disconnects while its texts wait has them dropped from the queue before they cost compute.
Errors use OpenAI's shape with the status of :mod:`deepseek.serve.errors`.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import numpy as np
import orjson
import torch
from fastapi import APIRouter, Request
from fastapi.responses import Response

from deepseek.serve.errors import INTERNAL, RequestError, error_kind
from deepseek.serve.manager import ModelVersion
from deepseek.serve.protocols.http_context import (ClientGone, access_logged, log_access, read_inference_body,
                                                  select_named_version, serving)
from deepseek.serve.protocols.http_errors import OpenAIRoute

MAX_INPUTS = 2048  # OpenAI's limit of inputs per request
FIELDS = {"model", "input", "encoding_format", "dimensions", "user"}
INLINE_TOKENIZE = 32  # up to this many texts are tokenized on the event loop; more go to a worker thread

router = APIRouter(route_class=OpenAIRoute)


def parse_input(value: Any) -> list[str]:
    """``input`` as a list of non-empty texts; a 400 that says why otherwise (token ids included)."""
    texts = [value] if isinstance(value, str) else value
    if isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts):
        if len(texts) > MAX_INPUTS:
            raise RequestError(f"'input' holds {len(texts)} texts; at most {MAX_INPUTS} per request", param="input")
        empty = next((i for i, t in enumerate(texts) if not t), None)
        if empty is not None:
            raise RequestError(f"'input' must not contain empty strings (input[{empty}] is empty)", param="input")
        return texts
    if isinstance(texts, list) and texts and all(isinstance(t, int) or (isinstance(t, list) and all(
            isinstance(i, int) for i in t)) for t in texts):
        raise RequestError("'input' holds token ids: send text instead. This model's word-piece ids are not "
                           "OpenAI's tiktoken ids (LangChain: OpenAIEmbeddings(check_embedding_ctx_length=False))",
                           param="input")
    raise RequestError("'input' must be a non-empty string or a non-empty list of strings", param="input")


def embedding_model(request: Request, model: Any) -> ModelVersion:
    """The READY version of the embedding model ``model`` (a name, or name/version) names."""
    return model_of_backend(request, model, "embedding")


def model_of_backend(request: Request, model: Any, backend: str) -> ModelVersion:
    """The READY version ``model`` (a name, or name/version) names, which must be served by ``backend``: 400 for
    a malformed name or another backend, 404 unknown, 503 not ready (each naming the field at fault)."""
    article = "an" if backend[0] in "aeiou" else "a"
    if not isinstance(model, str) or not model:
        raise RequestError(f"'model' is required: {article} {backend} model's name, or name/version", param="model")
    mv, name = select_named_version(request, model)
    if mv.config.backend != backend:  # e.g. a retrieval model embeds with its index's model, but answers /v1/retrieve
        raise RequestError(f"model {name!r} is not {article} {backend} model (backend {mv.config.backend})", param="model")
    return mv


def _padded(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


async def embed(request: Request, mv: ModelVersion, texts: list[str]) -> tuple[np.ndarray, int]:
    """The texts' unit vectors ``[n, dimension]`` through the model's batcher, and the tokens embedded."""
    embedder = mv.backend.embedder
    if len(texts) <= INLINE_TOKENIZE:
        rows = embedder.token_ids(texts)
    else:  # thousands of texts take long enough to stall every other request on the loop
        rows = await asyncio.to_thread(embedder.token_ids, texts)
    piece = mv.batcher.max_batch_size if mv.batcher is not None and mv.batcher.combine else len(rows)
    manager = serving(request).manager
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(manager.run(mv, _padded(rows[i:i + piece], embedder.pad_token_id)))
             for i in range(0, len(rows), piece)]
    gone: list[bool] = []
    watcher = loop.create_task(_cancel_on_disconnect(request, tasks, gone))
    try:
        parts = await asyncio.gather(*tasks)
    except asyncio.CancelledError:
        if gone:  # the client went away: its pieces still queued are dropped before they cost compute
            raise ClientGone() from None
        raise
    except Exception as exc:
        if error_kind(exc) is INTERNAL:  # the model itself failed: this request gets a 500, the server goes on
            raise RequestError(f"model {mv.name!r} failed: {exc}", INTERNAL) from exc
        raise
    finally:
        watcher.cancel()
        for task in tasks:  # one piece refused (a full queue): the others are not worth computing
            task.cancel()
    vectors = torch.cat([part["embedding"] for part in parts]).numpy()
    return vectors, sum(len(row) for row in rows)


async def _cancel_on_disconnect(request: Request, tasks: list[asyncio.Task], gone: list[bool]) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    gone.append(True)
    for task in tasks:
        task.cancel()


@router.post("/v1/embeddings")
@access_logged("openai/embeddings")
async def embeddings(request: Request):
    started = time.monotonic()
    ctx = serving(request)
    body = await read_inference_body(request, FIELDS)
    request.state.access_user = body.get("user")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise RequestError(f"'encoding_format' must be 'float' or 'base64', got {encoding!r}",
                           param="encoding_format")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise RequestError("'user' must be a string", param="user")
    texts = parse_input(body.get("input"))
    mv = embedding_model(request, body.get("model"))
    dimension = mv.backend.dimension
    dimensions = body.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or dimensions != dimension):
        raise RequestError(f"'dimensions' must be this model's {dimension} (its vectors are not shortened), got "
                           f"{dimensions!r}", param="dimensions")
    vectors, tokens = await embed(request, mv, texts)
    ctx.metrics.observe_embedding(mv.name, mv.version, len(texts), tokens)
    log_access(request, "openai/embeddings", started, 200, batch_size=len(texts), tokens_in=tokens)
    vectors = np.ascontiguousarray(vectors, dtype="<f4")  # base64: little-endian float32, what the SDK decodes
    if encoding == "base64":
        data = [base64.b64encode(row.tobytes()).decode("ascii") for row in vectors]
    else:
        data = list(vectors)
    answer = {"object": "list",
              "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(data)],
              "model": body["model"], "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return Response(orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")
