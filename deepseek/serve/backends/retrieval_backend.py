"""The ``retrieval`` backend: a knowledge index (``ds rag index``) served at ``POST /v1/retrieve``.

    # <repo>/kb/config.yaml                     the version folder 1/ may be empty when parameters.index names one
    backend: retrieval
    parameters: {index: ../indexes/kb, mode: hybrid, k: 5}   # relative to this file's folder; default: the version
    # parameters.fusion: how hybrid fuses dense and BM25 (convex, the default, or rrf)
                                                             # folder itself is the index directory
    # parameters.max_k (100), max_queries (64): the largest k and number of queries a request may ask for
    # parameters.batch_tokens: padded tokens per forward, as for embedding models
    # max_batch_size: 64, dynamic_batching: {} are the defaults for this backend

The index's own embedding model (its manifest's) is loaded at ``precision``, and it is what sits behind the
dynamic batcher: the route tokenizes each request's queries and queues their ids, so the queries of concurrent
requests are embedded in one call (the tensors are those of an embedding model: ``input_ids``,
``attention_mask`` -> ``embedding``; KServe v2 infer reaches them too). Each request's FAISS and BM25 search then
runs with its own k, mode and filters (:meth:`RetrievalBackend.search`), in a worker thread.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from deepseek.rag.embed import BATCH_TOKENS, Embedder
from deepseek.rag.retrieve import FUSIONS, MODES, Hit, Retriever
from deepseek.serve.backends.base import BackendError
from deepseek.serve.backends.embedding_backend import EmbedderBackend
from deepseek.serve.config import ServingConfig

PARAMETERS = ("index", "mode", "fusion", "k", "max_k", "max_queries", "batch_tokens")
DEFAULT_MAX_K = 100
DEFAULT_MAX_QUERIES = 64
RETRIEVERS_KEPT = 32  # filter combinations whose allowed-chunk sets are kept (each costs one pass over the chunks)


def _positive_int(name: str, params: dict, key: str, default: int) -> int:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BackendError(f"model {name!r}: parameters.{key} must be a positive integer, got {value!r}")
    return value


class RetrievalBackend(EmbedderBackend):
    platform = "deepseek_rag"

    def __init__(self, name: str, version: int, path: Path, config: ServingConfig):
        from deepseek.rag.index import KnowledgeIndex, read_manifest

        params = config.parameters or {}
        unknown = sorted(set(params) - set(PARAMETERS))
        if unknown:
            raise BackendError(f"model {name!r}: unknown parameters {', '.join(unknown)} of the retrieval backend "
                               f"({', '.join(PARAMETERS)})")
        self.mode = params.get("mode", "hybrid")
        if self.mode not in MODES:
            raise BackendError(f"model {name!r}: parameters.mode {self.mode!r} is not one of {', '.join(MODES)}")
        self.fusion = params.get("fusion", "convex")
        if self.fusion not in FUSIONS:
            raise BackendError(f"model {name!r}: parameters.fusion {self.fusion!r} is not one of "
                               f"{', '.join(FUSIONS)}")
        self.max_k = _positive_int(name, params, "max_k", DEFAULT_MAX_K)
        self.default_k = _positive_int(name, params, "k", min(5, self.max_k))
        if self.default_k > self.max_k:
            raise BackendError(f"model {name!r}: parameters.k ({self.default_k}) exceeds max_k ({self.max_k})")
        self.max_queries = _positive_int(name, params, "max_queries", DEFAULT_MAX_QUERIES)
        index = params.get("index")
        # relative to config.yaml's folder (an absolute path stays absolute); without one, the version folder
        index_path = Path(path) if index is None else Path(path).parent / str(index)
        try:
            embedder = Embedder.load(read_manifest(index_path)["embedding"]["name"], precision=config.precision)
            self.index = KnowledgeIndex.open(index_path, embedder=embedder)
        except Exception as exc:  # no index there, a damaged file, a model that cannot be loaded: one line
            raise BackendError(f"model {name!r} version {version}: {exc}") from exc
        super().__init__(name, version, path, config, embedder, params.get("batch_tokens", BATCH_TOKENS))
        self._retrievers: dict[tuple, Retriever] = {}
        self._lock = threading.Lock()

    def describe(self) -> dict:
        """What the index holds and the request defaults (for ``/v1/models/{model}``)."""
        manifest = self.index.manifest
        return {"index": str(self.index.path), "chunks": len(self.index), "embedding_model": manifest["embedding"]
                ["name"], "mode": self.mode, "fusion": self.fusion, "k": self.default_k, "max_k": self.max_k,
                "max_queries": self.max_queries}

    def retriever(self, mode: str, paths: Sequence[str], types: Sequence[str]) -> Retriever:
        """A :class:`Retriever` for this mode and these filters; kept, since a filtered one walks every chunk once
        to find the allowed ones. ``RetrievalError`` for an unknown mode or file type."""
        key = (mode, tuple(paths), tuple(sorted(set(types))))
        with self._lock:
            found = self._retrievers.get(key)
        if found is not None:
            return found
        made = Retriever(self.index, mode, paths=paths, types=types, fusion=self.fusion)
        with self._lock:
            if len(self._retrievers) >= RETRIEVERS_KEPT:
                self._retrievers.pop(next(iter(self._retrievers)))  # the oldest combination goes
            self._retrievers[key] = made
        return made

    def search(self, queries: list[str], vectors: np.ndarray, k: int, mode: Optional[str] = None,
               paths: Sequence[str] = (), types: Sequence[str] = ()) -> list[list[Hit]]:
        """The ``k`` best chunks of each query, best first, for queries embedded by this backend's model."""
        retriever = self.retriever(mode or self.mode, paths, types)
        return retriever.search_many(queries, k, query_vectors=vectors)

    def close(self) -> None:
        super().close()
        self.index = None
        self._retrievers.clear()
