"""Retrieval quality on a question set: recall@k, MRR@k and nDCG@k for dense, BM25 and hybrid retrieval.

A question set is JSONL, one question a line::

    {"query": "Decode a JSON document", "relevant": [{"source": "corpus/code/json/decoder.py", "span": [330, 330]}]}

Each entry of ``relevant`` selects chunks of the index: ``source`` (a path; a relative one is read from the question
file's folder) and optionally ``title`` (the chunk's heading or definition name) and ``span`` ([start, end]; a chunk
matches when its span overlaps it). A selector without title or span selects every chunk of its source.

Relevance is binary and counted per selector (sentence-transformers' InformationRetrievalEvaluator definitions, the
document being the selector): a selector is found at the rank of the first retrieved chunk it matches, so a function
split into two chunks counts once. With one selector per question holding one chunk each, these are the textbook
definitions:

- recall@k = |selectors found in the top k| / |selectors|
- MRR@k = 1 / rank of the first relevant chunk within k, else 0
- nDCG@k = DCG@k / IDCG@k, DCG@k = sum over ranks i <= k of rel_i / log2(i + 1), rel_i = 1 where a selector is
  first found, IDCG = the DCG of min(|selectors|, k) found at ranks 1, 2, ...
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from deepseek.errors import UserFacingError
from deepseek.rag.retrieve import MODES, Retriever

if TYPE_CHECKING:
    from deepseek.rag.index import Chunk, KnowledgeIndex


class QuestionSetError(UserFacingError, ValueError):
    """A question file that cannot be read as queries with relevant chunk selectors."""


@dataclass(frozen=True)
class Selector:
    """Chunks of ``source`` (resolved), narrowed by ``title`` and/or an overlapping ``span`` when given."""

    source: str
    title: Optional[str] = None
    span: Optional[tuple[int, int]] = None

    def matches(self, chunk: "Chunk") -> bool:
        if self.title is not None and chunk.title != self.title:
            return False
        if self.span is not None and (chunk.span[1] < self.span[0] or chunk.span[0] > self.span[1]):
            return False
        return True


@dataclass
class Question:
    query: str
    relevant: list[Selector] = field(default_factory=list)


def load_questions(path: str | Path) -> list[Question]:
    """The questions of a JSONL file (format in the module docstring); a bad line is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise QuestionSetError(f"{path}: no such question file")
    base = path.resolve().parent
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QuestionSetError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("query"), str) or not row["query"].strip():
            raise QuestionSetError(f"{where}: needs a non-empty string 'query'")
        relevant = row.get("relevant")
        if not isinstance(relevant, list) or not relevant:
            raise QuestionSetError(f"{where}: needs 'relevant', a non-empty list of chunk selectors")
        questions.append(Question(row["query"], [_selector(s, base, where) for s in relevant]))
    if not questions:
        raise QuestionSetError(f"{path}: no questions")
    return questions


def _selector(raw, base: Path, where: str) -> Selector:
    if not isinstance(raw, dict) or not isinstance(raw.get("source"), str):
        raise QuestionSetError(f"{where}: a selector is an object with a string 'source'")
    title, span = raw.get("title"), raw.get("span")
    if title is not None and not isinstance(title, str):
        raise QuestionSetError(f"{where}: a selector's 'title' must be a string")
    if span is not None:
        if (not isinstance(span, list) or len(span) != 2 or not all(isinstance(v, int) for v in span)
                or span[0] > span[1]):
            raise QuestionSetError(f"{where}: a selector's 'span' must be [start, end] integers, start <= end")
        span = (span[0], span[1])
    source = Path(raw["source"])
    return Selector(str((source if source.is_absolute() else base / source).resolve()), title, span)


def relevant_ids(question: Question, by_source: dict[str, list["Chunk"]]) -> list[frozenset[int]]:
    """The chunk ids each selector of ``question`` matches (selectors matching nothing left out)."""
    found = []
    for selector in question.relevant:
        ids = frozenset(c.id for c in by_source.get(selector.source, ()) if selector.matches(c))
        if ids and ids not in found:
            found.append(ids)
    return found


def query_metrics(ranked: Sequence[int], relevant: Sequence[frozenset[int]], k: int) -> dict[str, float]:
    """recall@k, MRR@k and nDCG@k of one ranked list of chunk ids (definitions in the module docstring)."""
    found_at: dict[int, int] = {}  # selector index -> rank where it is first found
    gains = []
    for rank, cid in enumerate(ranked[:k], start=1):
        new = [s for s, ids in enumerate(relevant) if s not in found_at and cid in ids]
        for s in new:
            found_at[s] = rank
        gains.append(1.0 if new else 0.0)
    first = min(found_at.values(), default=None)
    dcg = sum(g / math.log2(i + 1) for i, g in enumerate(gains, start=1))
    ideal = sum(1.0 / math.log2(i + 1) for i in range(1, min(len(relevant), k) + 1))
    return {"recall": len(found_at) / len(relevant), "mrr": 1.0 / first if first else 0.0,
            "ndcg": dcg / ideal if ideal else 0.0}


def evaluate(index: "KnowledgeIndex", questions: Sequence[Question], k: int = 5,
             modes: Sequence[str] = MODES, fusion: str = "convex") -> dict:
    """Mean recall@k, MRR@k and nDCG@k of each retrieval mode over ``questions``, plus ms per query; ``hybrid``
    fuses by ``fusion`` (recorded in the report).

    Questions none of whose selectors matches a chunk of the index are left out and counted as ``unmatched``;
    when that is all of them the index is not the question set's corpus: a :class:`QuestionSetError`.
    """
    by_source: dict[str, list] = {}
    for chunk in index.chunks.values():
        by_source.setdefault(str(Path(chunk.source).resolve()), []).append(chunk)
    judged = [(q, ids) for q in questions if (ids := relevant_ids(q, by_source))]
    if not judged:
        raise QuestionSetError(f"none of the {len(questions)} questions' relevant chunks is in the index: "
                               "was the index built from the question set's corpus?")
    queries = [q.query for q, _ in judged]
    report = {"k": k, "questions": len(judged), "unmatched": len(questions) - len(judged), "fusion": fusion,
              "modes": {}}
    for mode in modes:
        start = time.perf_counter()
        results = Retriever(index, mode, fusion=fusion).search_many(queries, k)
        seconds = time.perf_counter() - start
        per_query = [query_metrics([h.chunk.id for h in hits], ids, k) for hits, (_, ids) in zip(results, judged)]
        report["modes"][mode] = {f"{name}@{k}": sum(m[name] for m in per_query) / len(per_query)
                                 for name in ("recall", "mrr", "ndcg")}
        report["modes"][mode]["ms_per_query"] = 1000 * seconds / len(queries)
    return report
