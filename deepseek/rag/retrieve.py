"""Retrieval over a knowledge index: dense (FAISS), lexical (BM25), or both fused (hybrid).

    retriever = Retriever(index, mode="hybrid", paths=["*/json/*.py"], types=["py"])
    hits = retriever.search("decode a JSON document", k=5)      # [Hit(chunk, score, rank), ...], best first

Hybrid fusion (``fusion="convex"``, the default) is a convex combination of min-max normalised scores over the
dense and the BM25 top-(4k): ``(1 - w) * dense + w * bm25`` with w = 0.3, a chunk missing from one list scoring 0
there (Bruch, Gai and Ingber, "An Analysis of Fusion Functions for Hybrid Retrieval", TOIS 2023: with a weight tuned
on a few questions it beats reciprocal rank fusion). w was chosen on a tuning split of stdlib modules and reported on
others (docs/rag.md "Evaluation"). ``fusion="rrf"`` is reciprocal rank fusion (Cormack, Clarke and Büttcher, SIGIR
2009): each list gives a chunk 1/(60 + rank) and the sums rank the union; it needs no weight, but lets the weaker
list displace the stronger one's first places as often as the reverse — on natural-language questions about code,
where BM25 is far weaker than the embeddings, it cost 3–6 points of recall@5 against dense alone.

Metadata filters (path globs, file types) are applied to the candidate lists *before* they are cut to k, and the
candidate lists are deepened until enough chunks pass, so a filtered search returns k hits whenever k chunks match.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import PurePath
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np

from deepseek.config import ConfigError
from deepseek.errors import UserFacingError

if TYPE_CHECKING:
    from deepseek.rag.index import Chunk, KnowledgeIndex

MODES = ("hybrid", "dense", "bm25")
FILE_TYPES = ("py", "md", "rst", "txt", "html", "pdf", "jsonl")
FUSIONS = ("convex", "rrf")
RRF_K = 60
BM25_WEIGHT = 0.3  # convex fusion's weight of the BM25 list: chosen on a tuning split (docs/rag.md "Evaluation")
CANDIDATES_PER_HIT = 4  # each list hybrid fuses holds the top 4k, so a chunk ranked low by one side can still rise


class RetrievalError(UserFacingError, ConfigError):
    """A retrieval request that cannot be served as asked (unknown mode or file type, k < 1): a usage error."""


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Fuse ranked lists of ids: ``score(d) = sum over lists of 1 / (k + rank(d))``, ranks starting at 1.

    Returns (id, score) pairs, best first. Equal scores keep the order in which the ids were first met reading
    the lists rank by rank (rank 1 of every list, then rank 2, ...), so the result is deterministic and, at a
    tie, an id ranked higher somewhere comes first.
    """
    if k < 0:
        raise RetrievalError(f"the fusion constant k must be >= 0, got {k}")
    scores: dict[int, float] = {}
    depth = max((len(r) for r in rankings), default=0)
    for position in range(depth):  # rank by rank across the lists: insertion order is the tie-break
        for ranking in rankings:
            if position < len(ranking):
                item = ranking[position]
                scores[item] = scores.get(item, 0.0) + 1.0 / (k + position + 1)
    return sorted(scores.items(), key=lambda pair: -pair[1])  # sorted() is stable: ties stay in insertion order


def check_bm25_weight(bm25_weight: float) -> None:
    if not 0.0 <= bm25_weight <= 1.0:
        raise RetrievalError(f"the BM25 weight must be in [0, 1], got {bm25_weight}")


def convex_fusion(dense: Sequence[tuple[int, float]], lexical: Sequence[tuple[int, float]],
                  bm25_weight: float = BM25_WEIGHT) -> list[tuple[int, float]]:
    """Fuse two scored lists: ``(1 - w) * minmax(dense) + w * minmax(bm25)``, best first.

    Each list's scores are mapped to [0, 1] by its own minimum and maximum (one score alone maps to 1); a chunk
    missing from a list gets 0 there. Equal fused scores keep the order of first appearance, dense list first.
    """
    check_bm25_weight(bm25_weight)

    def normalised(pairs: Sequence[tuple[int, float]]) -> dict[int, float]:
        if not pairs:
            return {}
        low, high = min(s for _, s in pairs), max(s for _, s in pairs)
        span = high - low
        return {i: (s - low) / span if span > 0 else 1.0 for i, s in pairs}

    weights = ((1.0 - bm25_weight, normalised(dense)), (bm25_weight, normalised(lexical)))
    order = dict.fromkeys([i for i, _ in dense] + [i for i, _ in lexical])
    scores = {i: sum(w * scores.get(i, 0.0) for w, scores in weights) for i in order}
    return sorted(scores.items(), key=lambda pair: -pair[1])  # stable: ties keep the order of first appearance


@dataclass
class Hit:
    """One retrieved chunk: its ``score`` (cosine for dense, BM25 for bm25, the fused score for hybrid) and 1-based
    ``rank``."""

    chunk: "Chunk"
    score: float
    rank: int

    @property
    def location(self) -> str:
        """``source:start-end`` (lines), ``source p. N`` (pages) or ``source row N`` (JSONL rows)."""
        return chunk_location(self.chunk)

    def to_dict(self) -> dict:
        c = self.chunk
        return {"rank": self.rank, "score": self.score, "id": c.id, "source": c.source, "type": c.type,
                "span": list(c.span), "span_unit": c.span_unit, "title": c.title, "text": c.text,
                "metadata": dict(c.metadata)}


def chunk_location(chunk: "Chunk") -> str:
    """Where a chunk comes from, as a reader would look it up."""
    start, end = chunk.span
    if chunk.span_unit == "page":
        return f"{chunk.source} p. {start}" if start == end else f"{chunk.source} pp. {start}-{end}"
    if chunk.span_unit == "row":
        return f"{chunk.source} row {start}" if start == end else f"{chunk.source} rows {start}-{end}"
    return f"{chunk.source}:{start}" if start == end else f"{chunk.source}:{start}-{end}"


def path_matches(source: str, pattern: str) -> bool:
    """Whether ``source`` matches the glob ``pattern``: an absolute pattern is matched against the whole path, a
    relative one with a ``/`` against its end (``json/*.py``), one without a ``/`` against the file name; ``*``
    crosses folders (``docs/*.md`` matches ``docs/api/x.md``)."""
    if PurePath(pattern).is_absolute():
        return fnmatch.fnmatchcase(source, pattern)
    if "/" in pattern:
        return fnmatch.fnmatchcase(source, pattern) or fnmatch.fnmatchcase(source, "*/" + pattern)
    return fnmatch.fnmatchcase(PurePath(source).name, pattern)


def open_for_queries(path, *, embedder=None) -> "KnowledgeIndex":
    """Open the index at ``path`` for answering questions one at a time.

    Without an ``embedder``, the manifest's model is loaded at the precision of one-row work (``decode`` in
    :func:`deepseek.hardware.resolve_precision`), not the index's: a question is one short row, and on CPUs with
    native bf16, where indexing runs bf16, one-row bf16 products are slower than fp32 (a MiniLM query encode took
    1.24x the fp32 time on an AMX Xeon). Same model, same vectors up to rounding.
    """
    from deepseek.hardware import resolve_precision
    from deepseek.rag.embed import Embedder
    from deepseek.rag.extra import require_rag_extra
    from deepseek.rag.index import KnowledgeIndex, read_manifest

    require_rag_extra()
    if embedder is None:
        name = read_manifest(path)["embedding"]["name"]
        embedder = Embedder.load(name, precision=resolve_precision("auto", "cpu", workload="decode").precision)
    return KnowledgeIndex.open(path, embedder=embedder)


def check_options(mode: str, types: Optional[Sequence[str]] = None, fusion: str = "convex") -> None:
    """Refuse an unknown mode, fusion or file type (before an index is opened for nothing)."""
    if mode not in MODES:
        raise RetrievalError(f"unknown retrieval mode {mode!r}; choose one of {', '.join(MODES)}")
    if fusion not in FUSIONS:
        raise RetrievalError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")
    unknown = sorted(set(types or ()) - set(FILE_TYPES))
    if unknown:
        raise RetrievalError(f"unknown file type {', '.join(unknown)}; the index holds {', '.join(FILE_TYPES)}")


class Retriever:
    """Searches a :class:`~deepseek.rag.index.KnowledgeIndex` in one ``mode`` with optional metadata filters.

    ``paths``: globs, a chunk must match one (:func:`path_matches`); ``types``: file types (``py``, ``md``, ...),
    a chunk must have one. Both empty: every chunk is a candidate. ``fusion``: how ``hybrid`` fuses the two lists
    (``convex`` with ``bm25_weight``, or ``rrf`` with ``rrf_k``).
    """

    def __init__(self, index: "KnowledgeIndex", mode: str = "hybrid", *, paths: Optional[Sequence[str]] = None,
                 types: Optional[Sequence[str]] = None, fusion: str = "convex", bm25_weight: float = BM25_WEIGHT,
                 rrf_k: int = RRF_K):
        check_options(mode, types, fusion)
        check_bm25_weight(bm25_weight)
        self.index = index
        self.mode = mode
        self.fusion = fusion
        self.bm25_weight = bm25_weight
        self.paths = list(paths or ())
        self.types = set(types or ())
        self.rrf_k = rrf_k
        self._allowed = self._allowed_ids() if self.paths or self.types else None

    def _allowed_ids(self) -> set[int]:
        return {cid for cid, chunk in self.index.chunks.items()
                if (not self.types or chunk.type in self.types)
                and (not self.paths or any(path_matches(chunk.source, p) for p in self.paths))}

    def search(self, query: str, k: int = 5) -> list[Hit]:
        """The ``k`` best chunks for ``query``, best first."""
        return self.search_many([query], k)[0]

    def search_many(self, queries: Sequence[str], k: int = 5, *,
                    query_vectors: Optional[np.ndarray] = None) -> list[list[Hit]]:
        """:meth:`search` for several queries at once (one embedding batch, one FAISS and one BM25 call).

        ``query_vectors``: the queries already embedded by the index's model (row i for ``queries[i]``), as the
        server does for many requests at once; dense search then uses them instead of embedding again."""
        if k < 1:
            raise RetrievalError(f"k must be >= 1, got {k}")
        queries = list(queries)
        if not queries:
            return []
        dense_search = self.index.dense
        if query_vectors is not None:
            if len(query_vectors) != len(queries):
                raise ValueError(f"{len(query_vectors)} query vectors for {len(queries)} queries")
            dense_search = lambda _queries, depth: self.index.dense_by_vectors(query_vectors, depth)  # noqa: E731
        if self.mode == "dense":
            ranked = self._candidates(dense_search, queries, k)
        elif self.mode == "bm25":
            ranked = self._candidates(self.index.lexical, queries, k)
        else:
            depth = k * CANDIDATES_PER_HIT
            dense = self._candidates(dense_search, queries, depth)
            lexical = self._candidates(self.index.lexical, queries, depth)
            if self.fusion == "rrf":
                ranked = [reciprocal_rank_fusion([[i for i, _ in d], [i for i, _ in b]], self.rrf_k)
                          for d, b in zip(dense, lexical)]
            else:
                ranked = [convex_fusion(d, b, self.bm25_weight) for d, b in zip(dense, lexical)]
        chunks = self.index.chunks
        return [[Hit(chunks[cid], float(score), rank) for rank, (cid, score) in enumerate(pairs[:k], start=1)]
                for pairs in ranked]

    def _candidates(self, search: Callable[[list[str], int], list[list[tuple[int, float]]]], queries: list[str],
                    want: int) -> list[list[tuple[int, float]]]:
        """The top ``want`` (id, score) pairs of each query that pass the filters.

        Unfiltered, one call of ``want``. Filtered, the first depth assumes the allowed chunks are spread evenly
        through the ranking (``want`` x 4 x total / allowed), then it grows fourfold until every query has ``want``
        passing chunks (or all the allowed ones), or the search returned everything it had."""
        total = len(self.index.chunks)
        if self._allowed is None:
            return [pairs[:want] for pairs in search(queries, min(want, total))] if total else [[] for _ in queries]
        reachable = min(want, len(self._allowed))
        if reachable == 0:
            return [[] for _ in queries]
        depth = min(total, want * CANDIDATES_PER_HIT * -(-total // len(self._allowed)))
        while True:
            raw = search(queries, depth)
            kept = [[(cid, s) for cid, s in pairs if cid in self._allowed][:want] for pairs in raw]
            exhausted = depth >= total or all(len(pairs) < depth for pairs in raw)
            if exhausted or all(len(pairs) >= reachable for pairs in kept):
                return kept
            depth = min(total, depth * CANDIDATES_PER_HIT)
