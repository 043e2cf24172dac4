"""`ds logs` throughput and memory on a synthetic access log, against what a user would write with pandas.

    python benchmarks/bench_logs.py                               # 0.5 M and 2 M lines (the recorded run)
    python benchmarks/bench_logs.py --lines 20000 --small 5000    # a smoke run

The logs come from :mod:`deepseek.ops.logs.synthetic` (three models and the server's field mix: KServe infer with
queue/compute/batch, OpenAI chat with tokens/TTFT/adapter/variant, embeddings; 0.5 % errors) at 50 requests/s, so the
2 M-line log spans 11 hours. Every case runs alone in a fresh process pinned to one core (one process, one thread):

- ours: ``LogAnalyzer(by="model", window 1m)`` fed from ``read_lines`` and its report (quantiles, histograms,
  windows, the tail explained, outliers), i.e. ``ds logs LOG --json`` minus printing;
- anchor: ``pandas.read_json(path, lines=True)`` + ``groupby("model")`` p50/p90/p99/p99.9, mean, error rate and
  requests per minute (if pandas is installed; else ``json.loads`` into per-model sorted lists).

Reported: seconds, lines per minute (target >= 1 M for ours), and the peak RSS of the process and its growth over
the RSS after imports, for both sizes: ours must not grow with N. Also the parse alone: ``json.loads`` vs
``orjson.loads`` per line (why ours parses with orjson).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import machine_info, measure_in_subprocess, peak_rss_kib, print_machine, print_table, rss_now_kib
from common import setup_path, write_results

setup_path()


def pin_to_one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})


def run_ours(path: str) -> dict:
    from deepseek.ops.logs import LogAnalyzer, read_lines

    before = rss_now_kib()
    start = time.perf_counter()
    analyzer = LogAnalyzer(by="model", window_s=60)
    analyzer.feed(read_lines([path]))
    report = analyzer.report()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "lines": report["lines"], "rss_before_kib": before, "peak_rss_kib": peak_rss_kib(),
            "rss_after_kib": rss_now_kib(),  # the analyzer's state still alive: what it retains
            "p99": {k: g["p99_ms"] for k, g in report["groups"].items()}}


def run_anchor(path: str) -> dict:
    before = rss_now_kib()
    start = time.perf_counter()
    try:
        import pandas as pd
    except ImportError:
        pd = None
    if pd is not None:
        frame = pd.read_json(path, lines=True)
        groups = frame.groupby("model")["total_ms"]
        quantiles = groups.quantile([0.5, 0.9, 0.99, 0.999]).unstack()
        status = frame["status"]
        numeric = pd.to_numeric(status, errors="coerce")
        frame["error"] = (numeric >= 400) | (numeric.isna() & (status != "OK"))
        errors = frame.groupby("model")["error"].mean()
        per_minute = frame.groupby([frame["model"], (frame["time"] // 60)]).size()
        p99 = quantiles[0.99].to_dict()
        lines = len(frame)
        after = rss_now_kib()  # the frame still alive
        del errors, per_minute
        kind = "pandas.read_json(lines=True) + groupby quantiles"
    else:
        per_model: dict[str, list[float]] = {}
        lines = 0
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                per_model.setdefault(record["model"], []).append(record["total_ms"])
                lines += 1
        p99 = {}
        for model, values in per_model.items():
            values.sort()
            p99[model] = values[int(0.99 * (len(values) - 1))]
        after = rss_now_kib()
        kind = "json.loads + sorted lists"
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "lines": lines, "rss_before_kib": before, "peak_rss_kib": peak_rss_kib(),
            "rss_after_kib": after, "p99": p99, "kind": kind}


def parse_only(path: str, n: int) -> dict:
    """Seconds per line of json.loads and orjson.loads over the first ``n`` lines."""
    import orjson

    with open(path, "rb") as f:
        lines = [line for _, line in zip(range(n), f)]
    out = {}
    for name, loads in (("json.loads", json.loads), ("orjson.loads", orjson.loads)):
        start = time.perf_counter()
        for line in lines:
            loads(line)
        out[name] = (time.perf_counter() - start) / len(lines)
    return out


def child(case: str, path: str) -> None:
    pin_to_one_core()
    import deepseek.ops.logs  # noqa: F401  (imports before the RSS baseline, for both cases alike)
    import deepseek.ops.logs.analyze  # noqa: F401
    import numpy  # noqa: F401
    import scipy.stats  # noqa: F401

    try:
        import pandas  # noqa: F401
    except ImportError:
        pass
    result = run_ours(path) if case == "ours" else run_anchor(path)
    print(json.dumps(result, default=str))


def make_log(folder: Path, n: int, seed: int) -> Path:
    from deepseek.ops.logs.synthetic import write_synthetic_log

    path = folder / f"access-{n}-{seed}.jsonl"
    if not path.exists():
        print(f"writing a synthetic log of {n:,} lines ...", flush=True)
        write_synthetic_log(path, n, seed=seed)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=2_000_000, help="the large log's lines")
    parser.add_argument("--small", type=int, default=500_000, help="the small log's lines")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "ds-bench-logs",
                        help="where the synthetic logs are written (kept for reruns)")
    parser.add_argument("--no-anchor", action="store_true", help="skip pandas (it holds the whole log in memory)")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    info = machine_info()
    print_machine(info)
    args.dir.mkdir(parents=True, exist_ok=True)
    logs = {n: make_log(args.dir, n, args.seed) for n in (args.small, args.lines)}
    parse = parse_only(str(logs[args.small]), min(args.small, 100_000))
    print(f"parse only, per line: json.loads {parse['json.loads'] * 1e6:.2f} µs, orjson.loads "
          f"{parse['orjson.loads'] * 1e6:.2f} µs ({parse['json.loads'] / parse['orjson.loads']:.1f}x)")

    results: dict = {}
    rows = []
    for n, path in logs.items():
        for case in ("ours", "anchor"):
            if case == "anchor" and args.no_anchor:
                continue
            r = measure_in_subprocess(__file__, ["--child", case, str(path)], timeout=3600)
            results[f"{case}-{n}"] = r
            if "error" in r:
                rows.append([case, f"{n:,}", r["error"][:80], "", "", "", ""])
                continue
            r["lines_per_min"] = r["lines"] / r["seconds"] * 60
            # the high-water mark may be the imports' (torch): the RSS still held after the analysis shows the state
            r["rss_growth_mib"] = (max(r["peak_rss_kib"], r["rss_after_kib"]) - r["rss_before_kib"]) / 1024
            r["rss_held_mib"] = (r["rss_after_kib"] - r["rss_before_kib"]) / 1024
            rows.append([case if case == "ours" else r.get("kind", case), f"{n:,}", f"{r['seconds']:.1f}",
                         f"{r['lines_per_min'] / 1e6:.2f} M", f"{r['peak_rss_kib'] / 1024:.0f}",
                         f"{r['rss_growth_mib']:.0f}", f"{r['rss_held_mib']:.0f}"])
    print_table(["case (1 process, 1 core)", "lines", "seconds", "lines/min", "peak RSS MiB", "peak - start MiB",
                 "held after MiB"], rows)
    for n in logs:
        ours, anchor = results.get(f"ours-{n}", {}), results.get(f"anchor-{n}", {})
        if "seconds" in ours and "seconds" in anchor:
            print(f"{n:,} lines: anchor / ours time {anchor['seconds'] / ours['seconds']:.2f}x, peak RSS growth "
                  f"{anchor['rss_growth_mib']:.0f} vs {ours['rss_growth_mib']:.0f} MiB")
    small, large = results.get(f"ours-{args.small}", {}), results.get(f"ours-{args.lines}", {})
    if "seconds" in small and "seconds" in large:
        print(f"ours: RSS growth {small['rss_growth_mib']:.0f} MiB at {args.small:,} lines, "
              f"{large['rss_growth_mib']:.0f} MiB at {args.lines:,}; throughput target >= 1 M lines/min: "
              f"{'met' if min(small['lines_per_min'], large['lines_per_min']) >= 1e6 else 'NOT met'}")
    write_results("logs", {"machine": info, "parse_only_s_per_line": parse, "results": results,
                           "lines": [args.small, args.lines], "cores": 1, "processes": 1})


if __name__ == "__main__":
    sys.exit(main())
