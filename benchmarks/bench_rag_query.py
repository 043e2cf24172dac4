"""Retrieval quality and query latency of `ds rag` against LangChain, same corpus and embedding model, one run.

    python benchmarks/bench_rag_query.py                       # makes the evalset and our index when missing
    python benchmarks/bench_rag_query.py --module json --limit 20 --latency-queries 20   # a quick smoke run

Corpus and questions: `ds rag make-evalset` (docstring -> code over stdlib modules, docstrings removed from the
indexed copy; prose over pydoc topics). Ours: `ds rag index` of the evalset corpus (structure-aware chunks of at most
256 MiniLM tokens), searched dense, BM25 and hybrid. LangChain (the anchor): `RecursiveCharacterTextSplitter`
(`from_language(PYTHON)` for .py; `--chunk-size` 1000 / `--chunk-overlap` 200 characters, the tutorials' setting)
+ `HuggingFaceEmbeddings` over the same all-MiniLM-L6-v2 files (normalized, so inner product = cosine) + the
community `FAISS` store (inner product), searched with `similarity_search`. A LangChain chunk is judged by the same
selectors as ours: its source and its line span (from ``add_start_index``).

Latency: one query at a time, k = 5, each question through every system in a rotating order; p50 and p90.
Targets (issue 19): hybrid recall@5 >= LangChain dense recall@5 + 5 points on docstring -> code; query p50 at k = 5
<= LangChain's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import machine_info, print_machine, print_table, setup_path, write_results

setup_path()

import torch  # noqa: E402

from deepseek.rag.evaluate import evaluate, load_questions, query_metrics, relevant_ids  # noqa: E402
from deepseek.rag.evalset import write_evalset  # noqa: E402
from deepseek.rag.index import Chunk, build_index  # noqa: E402
from deepseek.rag.retrieve import Retriever, open_for_queries  # noqa: E402

MODULES = ["json", "email", "http", "urllib", "logging", "textwrap", "csv", "string", "shutil", "os", "pathlib",
           "tarfile", "zipfile"]
SETS = ("code.jsonl", "prose.jsonl")


def langchain_store(corpus: Path, chunk_size: int, chunk_overlap: int, model_path: str):
    """(store, {id: Chunk}, seconds to build): LangChain's usual recipe over the files under ``corpus``."""
    from langchain_community.vectorstores import FAISS
    from langchain_community.vectorstores.utils import DistanceStrategy
    from langchain_core.documents import Document
    from langchain_huggingface import HuggingFaceEmbeddings
    from langchain_text_splitters import Language, RecursiveCharacterTextSplitter

    began = time.perf_counter()
    code = RecursiveCharacterTextSplitter.from_language(Language.PYTHON, chunk_size=chunk_size,
                                                        chunk_overlap=chunk_overlap, add_start_index=True)
    prose = RecursiveCharacterTextSplitter(chunk_size=chunk_size, chunk_overlap=chunk_overlap, add_start_index=True)
    docs, chunks = [], {}
    for path in sorted(p for p in corpus.rglob("*") if p.is_file()):
        text = path.read_text(encoding="utf-8", errors="replace")
        splitter = code if path.suffix == ".py" else prose
        for doc in splitter.create_documents([text], metadatas=[{"source": str(path.resolve())}]):
            start = text.count("\n", 0, doc.metadata["start_index"]) + 1
            span = (start, start + doc.page_content.count("\n"))
            cid = len(docs)
            docs.append(Document(page_content=doc.page_content, metadata={**doc.metadata, "chunk_id": cid}))
            chunks[cid] = Chunk(cid, doc.page_content, str(path.resolve()), path.suffix[1:], span, "lines", "", "")
    embeddings = HuggingFaceEmbeddings(model_name=model_path, model_kwargs={"device": "cpu"},
                                       encode_kwargs={"normalize_embeddings": True, "batch_size": 64})
    store = FAISS.from_documents(docs, embeddings, distance_strategy=DistanceStrategy.MAX_INNER_PRODUCT)
    return store, chunks, time.perf_counter() - began


def langchain_metrics(store, chunks: dict, questions, k: int) -> dict:
    by_source: dict[str, list] = {}
    for chunk in chunks.values():
        by_source.setdefault(chunk.source, []).append(chunk)
    judged = [(q, ids) for q in questions if (ids := relevant_ids(q, by_source))]
    per_query = []
    for question, ids in judged:
        ranked = [d.metadata["chunk_id"] for d in store.similarity_search(question.query, k=k)]
        per_query.append(query_metrics(ranked, ids, k))
    return {f"{name}@{k}": sum(m[name] for m in per_query) / len(per_query) for name in ("recall", "mrr", "ndcg")}


def latencies(cases: dict, queries: list[str]) -> dict[str, list[float]]:
    """Seconds of each case per query, one query at a time, the order of the cases rotating per query."""
    names = list(cases)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i, query in enumerate(queries):
        for name in names[i % len(names):] + names[:i % len(names)]:
            began = time.perf_counter()
            cases[name](query)
            times[name].append(time.perf_counter() - began)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evalset", default="runs/rag-evalset", help="made by `ds rag make-evalset` when missing")
    parser.add_argument("--index", default="runs/rag-evalset-kb", help="built from EVALSET/corpus when missing")
    parser.add_argument("--module", nargs="+", default=MODULES, help="stdlib modules of a new evalset")
    parser.add_argument("--limit", type=int, default=200, help="questions per set of a new evalset")
    parser.add_argument("-k", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=1000, help="LangChain splitter, characters")
    parser.add_argument("--chunk-overlap", type=int, default=200, help="LangChain splitter, characters")
    parser.add_argument("--latency-queries", type=int, default=200, help="questions timed one at a time (code "
                                                                         "questions first, then prose)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = machine_info()
    print_machine(info)

    evalset, index_dir = Path(args.evalset), Path(args.index)
    if not (evalset / "manifest.json").is_file():
        write_evalset(evalset, limit=args.limit, modules=args.module)
    ours_build_s = None
    if not (index_dir / "manifest.json").is_file():
        ours_build_s = build_index([str(evalset / "corpus")], index_dir, progress=False)["seconds"]
    index = open_for_queries(index_dir)  # as `ds rag query` and DeepSeekRetriever open it
    store, lc_chunks, lc_build_s = langchain_store(evalset / "corpus", args.chunk_size, args.chunk_overlap,
                                                   str(index.embedder.path))

    k = args.k
    quality = {}
    for name in SETS:
        questions = load_questions(evalset / name)
        report = evaluate(index, questions, k)
        quality[name] = {**{f"ours-{m}": row for m, row in report["modes"].items()},
                         "langchain-dense": langchain_metrics(store, lc_chunks, questions, k)}
    print(f"\nour index: {len(index.chunks):,} chunks{f' built in {ours_build_s:.0f} s' if ours_build_s else ''}; "
          f"LangChain: {len(lc_chunks):,} chunks built in {lc_build_s:.0f} s (timing: other benchmarks)\n")
    rows = [[name, system, f"{row[f'recall@{k}']:.3f}", f"{row[f'mrr@{k}']:.3f}", f"{row[f'ndcg@{k}']:.3f}"]
            for name, systems in quality.items() for system, row in systems.items()]
    print_table(["set", "system", f"recall@{k}", f"MRR@{k}", f"nDCG@{k}"], rows)

    queries = [q.query for name in SETS for q in load_questions(evalset / name)][:args.latency_queries]
    retrievers = {mode: Retriever(index, mode) for mode in ("dense", "bm25", "hybrid")}
    cases = {f"ours-{mode}": (lambda q, r=r: r.search(q, k)) for mode, r in retrievers.items()}
    cases["langchain-dense"] = lambda q: store.similarity_search(q, k=k)
    latencies(cases, queries[:10])  # warm-up: first calls allocate
    times = latencies(cases, queries)
    lc_p50 = statistics.median(times["langchain-dense"])
    print()
    print_table(["system", "p50 ms", "p90 ms", "p50 / LangChain"],
                [[name, f"{statistics.median(t) * 1e3:.2f}", f"{statistics.quantiles(t, n=10)[-1] * 1e3:.2f}",
                  f"{statistics.median(t) / lc_p50:.2f}"] for name, t in times.items()])
    code = quality["code.jsonl"]
    gain = code["ours-hybrid"][f"recall@{k}"] - code["langchain-dense"][f"recall@{k}"]
    print(f"\nhybrid recall@{k} - LangChain dense recall@{k} on docstring -> code: {gain * 100:+.1f} points "
          f"(target >= +5); ours-hybrid p50 / LangChain p50: {statistics.median(times['ours-hybrid']) / lc_p50:.2f} "
          "(target <= 1)")
    write_results("bench_rag_query", {"machine": info, "args": vars(args), "quality": quality,
                                      "latency_s": times, "chunks": {"ours": len(index.chunks),
                                                                     "langchain": len(lc_chunks)},
                                      "build_s": {"ours": ours_build_s, "langchain": lc_build_s}})


if __name__ == "__main__":
    main()
