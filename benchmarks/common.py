"""Shared helpers for the benchmarks: interleaved timing, machine details, peak memory, tables, JSON.

The host these run on is noisy (2-thread throughput can drop 2-8x for minutes), so every benchmark
times ours and the anchor *interleaved*: round r runs every case once, in a rotating order, and
ratios are medians of the per-round ratios, which cancels slow phases that hit both cases alike.

Peak memory on CPU is measured honestly as the operating system sees it: a case runs alone in a fresh
subprocess, which reports its RSS high-water mark (``ru_maxrss``) after the case and the RSS just before
it (imports, model and inputs already in place); the difference is the memory the case itself needed.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


# -- machine ---------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """What a reader needs to compare numbers across runs."""
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores_visible": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    setup_path()
    from deepseek.hardware import cpu_name_and_flags

    info["cpu_flags"] = sorted(cpu_name_and_flags()[1])  # avx2, avx512_bf16, amx_bf16, avx512_vnni, ... present
    info["cpu_class"] = cpu_class(info["cpu_flags"], info["cpu_capability"])
    # torch/oneDNN held to AVX2 on a newer CPU (docs/hardware.md) emulate the AVX2 class: say so with the numbers
    limits = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
              if k in os.environ}
    if limits:
        info["isa_limits"] = limits
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info


def cpu_class(flags: list[str], capability: str) -> str:
    """The CPU class a result belongs to (docs/benchmarks.md keeps one table per class)."""
    if capability.startswith("AVX512") and ("amx_bf16" in flags or "avx512_bf16" in flags):
        return "AVX-512 + native bf16" + (" + AMX" if "amx_bf16" in flags else "")
    if capability.startswith("AVX512"):
        return "AVX-512, no native bf16"
    if capability == "AVX2":
        return "AVX2 only" + (" (held to AVX2 on a newer CPU)" if "avx512f" in flags else "")
    return capability


def print_machine(info: dict) -> None:
    print(f"# {info['date']}  {info['cpu']}  cores={info['cores_visible']}  torch={info['torch']} "
          f"({info['cpu_capability']})  threads={info['torch_threads']}  transformers={info['transformers']}")
    print(f"# CPU class: {info['cpu_class']}; flags: {' '.join(info['cpu_flags']) or '-'}"
          + (f"; ISA limits: {info['isa_limits']}" if info.get("isa_limits") else ""))


def matmul_peak_gflops(dtype: torch.dtype = torch.float32, n: int = 2048, seconds: float = 1.0) -> float:
    """Measured matmul throughput (GFLOP/s) of n x n matrices: the ceiling MFU is quoted against."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(3):  # best of 3 short bursts: the peak the hardware can reach right now
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            a @ b
            count += 1
        best = max(best, 2 * n**3 * count / (time.perf_counter() - start) / 1e9)
    return best


# -- timing ----------------------------------------------------------------------------------------

def time_call(fn: Callable[[], object], inner: int = 1) -> float:
    """Seconds per call of ``fn``, averaged over ``inner`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def interleaved(cases: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                inner: dict[str, int] | int = 1, budget_s: Optional[float] = None) -> dict[str, list[float]]:
    """Time every case once per round, rotating the order each round; returns seconds per call.

    ``inner`` (per case or for all) averages several calls into one measurement for fast cases.
    ``budget_s`` stops early (after at least 3 rounds) when the benchmark would take too long.
    """
    names = list(cases)
    per_case_inner = inner if isinstance(inner, dict) else {n: inner for n in names}
    for name in names:
        for _ in range(warmup):
            cases[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(time_call(cases[name], per_case_inner.get(name, 1)))
        if budget_s is not None and r >= 2 and time.perf_counter() - start > budget_s:
            break
    return times


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def spread(xs: list[float]) -> str:
    """``median (min-max)`` with 3 significant digits."""
    return f"{median(xs):.4g} ({min(xs):.4g}-{max(xs):.4g})"


def paired_ratio(num: list[float], den: list[float]) -> list[float]:
    """Per-round ratios num[r] / den[r] of interleaved measurements."""
    return [a / b for a, b in zip(num, den)]


# -- peak memory -------------------------------------------------------------------------------------

def rss_now_kib() -> int:
    """Current resident set size in KiB (Linux /proc; falls back to the high-water mark)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def measure_in_subprocess(script: str, args: list[str], timeout: float = 900) -> dict:
    """Run ``python script args`` and parse the JSON it prints on its last stdout line.

    The child is expected to print ``{"rss_before_kib": ..., "peak_rss_kib": ..., ...}``; a fresh
    process per case means the high-water mark belongs to that case alone.
    """
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- a batched server under load: one client against many ------------------------------------------------

def stdlib_texts(n: int, words: int) -> list[str]:
    """``n`` paragraphs of about ``words`` words from the standard library's modules (sorted files, in order)."""
    setup_path()
    from deepseek.data.sources import python_stdlib_dir

    texts: list[str] = []
    for path in sorted(python_stdlib_dir().glob("*.py")):
        tokens = re.sub(r"\s+", " ", path.read_text(encoding="utf-8", errors="replace")).split(" ")
        for start in range(0, len(tokens) - words, words):
            texts.append(" ".join(tokens[start:start + words]))
            if len(texts) == n:
                return texts
    return texts


def batch_metrics(url: str, model: str) -> dict:
    """Executed encode calls of ``model`` and their rows so far, from the server's ``ds_inference_batch_size``
    histogram (warm-up included: the texts per call of a load are a mean over its whole run)."""
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


def batched_load_rounds(url: str, path: str, bodies: list[bytes], *, model: str, loads: dict[str, int], rounds: int,
                        warmup_s: float, duration_s: float, server_pid: int,
                        marker: bytes) -> tuple[dict[str, list], dict[str, list[float]]]:
    """Closed-loop ``loads`` (name -> connections) on ``url`` + ``path``, each once per round in a rotating order:
    the :class:`~deepseek.bench.loadgen.LoadResult` s per load and round, and the mean rows per encode call of
    ``model`` (from :func:`batch_metrics`) per load and round."""
    setup_path()
    from deepseek.bench import loadgen

    results: dict[str, list] = {name: [] for name in loads}
    calls: dict[str, list[float]] = {name: [] for name in loads}
    for r in range(rounds):
        order = list(loads)[r % len(loads):] + list(loads)[:r % len(loads)]  # rotate: no load always first
        for name in order:
            print(f"round {r + 1}/{rounds}: {name} ({loads[name]} client(s)), {warmup_s:g} s warm-up "
                  f"+ {duration_s:g} s ...", flush=True)
            before = batch_metrics(url, model)
            results[name].append(loadgen.run_load(
                url, path, bodies, concurrency=loads[name], warmup_s=warmup_s, duration_s=duration_s,
                server_pid=server_pid, marker=marker, label=name))
            after = batch_metrics(url, model)
            calls[name].append((after["rows"] - before["rows"]) / max(after["batches"] - before["batches"], 1))
    return results, calls


def load_batched_server(serve_args: list[str], path: str, bodies: list[bytes], *, model: str, loads: dict[str, int],
                        rounds: int, warmup_s: float, duration_s: float, marker: bytes, torch_threads: Optional[int],
                        log_dir: Path) -> tuple[dict[str, list], dict[str, list[float]]]:
    """Start ``ds serve *serve_args`` (HTTP on a free port, no gRPC, ``--torch-threads`` when given), run
    :func:`batched_load_rounds` on it, and stop it; its log goes to ``log_dir``/server.log."""
    setup_path()
    from deepseek.bench import loadgen
    from deepseek.cli.bench import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "deepseek.cli.main", "serve", *serve_args, "--http-port", str(port), "--no-grpc"]
    if torch_threads is not None:
        command += ["--torch-threads", str(torch_threads)]
    server = loadgen.start_server(command, f"{url}/v2/health/ready", log_path=log_dir / "server.log", timeout_s=300)
    try:
        return batched_load_rounds(url, path, bodies, model=model, loads=loads, rounds=rounds, warmup_s=warmup_s,
                                   duration_s=duration_s, server_pid=server.pid, marker=marker)
    finally:
        loadgen.stop_server(server, grace_s=60)


def report_batched_rounds(results: dict[str, list], calls: dict[str, list[float]],
                          per_call: str) -> tuple[list[float], float, int]:
    """Print the table of :func:`batched_load_rounds` (``per_call`` heads the rows-per-encode column); return the
    per-round ratios concurrent / single, their median and the errors of every load."""
    rows = [[name, i + 1, f"{res.throughput:.1f}", f"{res.p50_ms:.1f}", f"{res.p99_ms:.1f}", res.error_count,
             f"{res.server_cpu_cores or 0:.2f}", f"{calls[name][i]:.1f}"]
            for name, rounds in results.items() for i, res in enumerate(rounds)]
    print_table(["load", "round", "req/s", "p50 ms", "p99 ms", "errors", "server CPU", per_call], rows)
    ratios = [c.throughput / s.throughput if s.throughput else float("nan")
              for c, s in zip(results["concurrent"], results["single"])]
    errors = sum(res.error_count for rounds in results.values() for res in rounds)
    return ratios, statistics.median(ratios), errors


# -- output ------------------------------------------------------------------------------------------

def print_table(headers: list[str], rows: list[list[object]]) -> None:
    """A Markdown table (pastes straight into docs/benchmarks.md)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")


def write_results(name: str, data: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    print(f"\nwrote {path.relative_to(REPO_ROOT)}")
    return path


def setup_path() -> None:
    """Let ``python benchmarks/bench_x.py`` import the package from the checkout without installing."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


def missing_model(path: str | Path, flags: str) -> bool:
    """True (after saying so) when ``path`` is not a model directory: ``make bench`` runs every script on a fresh
    checkout, so scripts that need the quickstart model skip (exit 0) rather than fail the others."""
    if Path(path, "config.json").is_file():
        return False
    print(f"skipped: {path} is not a model directory; run `make quickstart` first (or pass {flags})")
    return True


def complete(url: str, model: str, prompt: str, max_tokens: int = 48, timeout: float = 300) -> str:
    """One greedy ``/v1/completions`` answer of ``model`` at ``url`` (EOS ignored): checks that both sides of a
    serving benchmark generate the same text before they are timed."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())["choices"][0]["text"]


def add_load_arguments(parser, *, rounds: int, duration: float, tiny_help: str) -> None:
    """The options every serving benchmark takes: clients, rounds, warm-up and measured seconds per round, the
    server's torch threads, and ``--tiny`` (a smoke run of the script itself)."""
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--duration", type=float, default=duration)
    parser.add_argument("--torch-threads", type=int, default=1, help="the server's intra-op threads")
    parser.add_argument("--tiny", action="store_true", help=tiny_help)


def start_repository_server(repository, torch_threads: int, log_dir):
    """``ds serve --model-repository`` on a free port (HTTP only), ready: ``(server, base url)``; stop the server
    with ``loadgen.stop_server``."""
    from deepseek.bench import loadgen
    from deepseek.cli.bench import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "deepseek.cli.main", "serve", "--model-repository", str(repository),
               "--http-port", str(port), "--no-grpc", "--torch-threads", str(torch_threads)]
    server = loadgen.start_server(command, f"{url}/v2/health/ready", log_path=Path(log_dir) / "server.log",
                                  timeout_s=300)
    return server, url
