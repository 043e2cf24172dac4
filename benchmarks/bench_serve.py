"""Serving throughput and latency: ``ds serve`` vs LitServe 0.2.19, same models, same lean client, one run.

Models (built with ``torch.manual_seed(0)``; ours are TorchScript archives served by the ``torch`` backend,
LitServe runs the same eager modules with the same weights, ``benchmarks/litserve_server.py``):

  classifier  compute-bound: token ids [B, 64] (vocab 8000) -> Embedding(8000, 256) -> 4 x
              TransformerEncoderLayer(256, 4 heads, FFN 1024, batch_first) -> mean over the sequence ->
              Linear(256, 10) (shared/reference/litserve-baseline.md's model). Batching gains little here.
  mlp         batching-friendly: one row [B, 512] -> 2048 -> 2048 -> 10 (ReLU), ~5.3M fp32 weights: batch 1
              is a memory-bound matrix-vector product, batch 64 reuses every weight 64 times.
  trivial     server overhead: x [B, 4] -> x.sum(1) [B, 1].

Settings per model: ``mbs=1`` (ours: ``max_batch_size: 1``, no dynamic_batching; LitServe ``max_batch_size=1``)
and ``mbs=64/5ms`` (ours: ``max_batch_size: 64, dynamic_batching: {max_queue_delay_ms: 5}``; LitServe
``max_batch_size=64, batch_timeout=0.005``); trivial only the first. Each server runs alone as a subprocess
in its own session (``ds serve --model-repository`` / ``litserve_server.py``) and is stopped by its whole
process group. Load: :mod:`deepseek.bench.loadgen`, closed loop with 1, 16 and 64 connections, 3 s warm-up
then a window (15 s; ``--quick``: 5 s); only requests completing inside the window count. Server CPU is the
server's process group over the window (OpenMP spin-waiting included), client CPU this process.

Raw in-process throughput: our backend (``backend.infer`` under ``torch.inference_mode``) at batch 1/4/16/64
and the eager module at batch 1 and 64. A 1 s 512x512 matmul probe runs at the start, before each model and
at the end: the host is noisy, so compare rows of the same run only.

Targets (PASS/MISS):
  classifier, 64 clients: ours batched >= 0.9 x raw best-batch, >= 1.1 x LitServe batched, p99 <= LitServe's
  mlp, 64 clients: ours batched >= 4 x ours mbs=1, with p99 no worse
  trivial: p50 <= 0.6 ms at 1 client; peak >= 2000 req/s
  batched models, 1 client: p50(batched) - p50(mbs=1) well under the 5 ms queue window (< 2.5 ms)

    python benchmarks/bench_serve.py                   # ~12 minutes; writes benchmarks/results/bench_serve.json
    python benchmarks/bench_serve.py --quick --only trivial --out /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REPO_ROOT, RESULTS_DIR, machine_info, matmul_peak_gflops, print_machine,  # noqa: E402
                    print_table, setup_path)

setup_path()
from deepseek.bench import loadgen  # noqa: E402

VOCAB, SEQ, D_MODEL = 8000, 64, 256
CONCURRENCY = (1, 16, 64)
N_BODIES = 256
QUEUE_DELAY_MS = 5
LITSERVE = Path(__file__).resolve().parent / "litserve_server.py"


# -- the models ------------------------------------------------------------------------------------------------

class Classifier(nn.Module):
    """ids [B, 64] -> logits [B, 10]: the LitServe baseline's compute-bound classifier."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        self.layers = nn.ModuleList([nn.TransformerEncoderLayer(D_MODEL, 4, 1024, batch_first=True)
                                     for _ in range(4)])
        self.head = nn.Linear(D_MODEL, 10)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(dim=1))


class MLP(nn.Module):
    """x [B, 512] -> y [B, 10]: memory-bound at batch 1, so batching pays."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                                 nn.Linear(2048, 10))

    def forward(self, x):
        return self.net(x)


class Trivial(nn.Module):
    """x [B, 4] -> x.sum(1) [B, 1]: nothing but the server's own cost."""

    def forward(self, x):
        return x.sum(dim=1, keepdim=True)


MODELS = {"trivial": Trivial, "classifier": Classifier, "mlp": MLP}
INPUT_KEYS = {"classifier": ("ids", torch.long), "mlp": ("x", torch.float32), "trivial": ("x", torch.float32)}
SIGNATURES = {  # (input datatype, input row shape, output row shape) for config.yaml
    "classifier": ("INT64", [SEQ], [10]), "mlp": ("FP32", [512], [10]), "trivial": ("FP32", [4], [1])}


def build_model(kind: str) -> nn.Module:
    """The benchmark's ``kind`` model with seed-0 weights, in eval mode (LitServe's workers call this too)."""
    torch.manual_seed(0)
    return MODELS[kind]().eval()


def write_repository(root: Path, kind: str, scripted, batched: bool) -> Path:
    """``root/<kind>/{config.yaml, 1/model.pt}``: batched = max_batch_size 64 + a 5 ms queue, else 1."""
    name, _ = INPUT_KEYS[kind]
    datatype, in_shape, out_shape = SIGNATURES[kind]
    config = ["backend: torch", f"max_batch_size: {64 if batched else 1}",
              f"inputs: [{{name: {name}, datatype: {datatype}, shape: {in_shape}}}]",
              f"outputs: [{{name: y, datatype: FP32, shape: {out_shape}}}]"]
    if batched:
        config.append(f"dynamic_batching: {{max_queue_delay_ms: {QUEUE_DELAY_MS}}}")
    (root / kind / "1").mkdir(parents=True)
    (root / kind / "config.yaml").write_text("\n".join(config) + "\n")
    scripted.save(str(root / kind / "1" / "model.pt"))
    return root


def metadata(kind: str) -> dict:
    name, _ = INPUT_KEYS[kind]
    datatype, in_shape, _ = SIGNATURES[kind]
    return {"inputs": [{"name": name, "datatype": datatype, "shape": [-1, *in_shape]}]}


def raw_eager(kind: str, batches: list[int], seconds: float = 2.0) -> list[dict]:
    """Samples/s of the eager module (what LitServe runs) at each batch size."""
    from deepseek.cli.bench import random_inputs

    model = build_model(kind)
    name, _ = INPUT_KEYS[kind]
    rows = []
    with torch.inference_mode():
        for batch in batches:
            x = random_inputs(metadata(kind), batch, {}, VOCAB)[name]
            model(x), model(x)
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                model(x)
                calls += 1
            elapsed = time.perf_counter() - start
            rows.append({"batch": batch, "samples_per_s": batch * calls / elapsed,
                         "ms_per_call": elapsed / calls * 1e3})
    return rows


# -- servers ---------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def batch_counters(url: str, model: str):
    """``(items, executions)`` of ``model`` from our server's Triton-style ``/metrics``; None when unavailable."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        text = response.read().decode(errors="replace")
        conn.close()
    except OSError:
        return None
    if response.status != 200:
        return None
    totals = {"nv_inference_count": 0.0, "nv_inference_exec_count": 0.0}
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        name = name.removesuffix("_total")
        if name in totals and f'model="{model}"' in rest:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals["nv_inference_count"], totals["nv_inference_exec_count"]


def run_setting(label: str, command: list[str], ready_url: str, url: str, path: str, bodies: list[bytes],
                marker: bytes, grace_s: float, args, log: Path, model: str = None) -> list[dict]:
    """Start one server, run every concurrency against it, stop it; the results as dicts.

    With ``model`` (our server) each row gets ``mean_batch``: items per model execution from ``/metrics``,
    over the warm-up and the window.
    """
    print(f"\n## {label}", flush=True)
    t0 = time.perf_counter()
    try:
        proc = loadgen.start_server(command, ready_url, timeout_s=180, log_path=log, env=server_env())
    except RuntimeError as exc:
        print(f"  could not start: {exc}")
        return [{"label": label, "error": str(exc)}]
    print(f"  ready in {time.perf_counter() - t0:.1f} s (pid {proc.pid})", flush=True)
    rows = []
    try:
        for c in args.concurrency:
            before = batch_counters(url, model) if model else None
            r = loadgen.run_load(url, path, bodies, concurrency=c, warmup_s=args.warmup, duration_s=args.window,
                                 server_pid=proc.pid, marker=marker, label=label)
            after = batch_counters(url, model) if before else None
            row = r.to_dict()
            row["mean_batch"] = ((after[0] - before[0]) / (after[1] - before[1])
                                 if after and after[1] > before[1] else None)
            print(f"  c={c:<3} {r.throughput:8.1f} req/s  p50 {r.p50_ms:7.2f}  p95 {r.p95_ms:7.2f}  "
                  f"p99 {r.p99_ms:7.2f} ms  errors {r.error_count}  batch {fmt(row['mean_batch'])}  "
                  f"client {r.client_cpu_cores:.2f}  server {r.server_cpu_cores:.2f} cores", flush=True)
            rows.append(row)
    finally:
        loadgen.stop_server(proc, grace_s=grace_s)
    return rows


# -- report ----------------------------------------------------------------------------------------------------

def find(runs: dict, label: str, c: int):
    for row in runs.get(label, []):
        if row.get("concurrency") == c and "error" not in row:
            return row
    return None


def fmt(x, digits=1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def print_model_tables(kind: str, runs: dict, concs) -> None:
    rows = []
    for label, results in runs.items():
        for r in results:
            if "error" in r:
                rows.append([label, "-", "failed", "", "", "", r["error"][:60], "", "", ""])
                continue
            errors = ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items())) or "0"
            rows.append([label, r["concurrency"], fmt(r["throughput"]), fmt(r["p50_ms"], 2), fmt(r["p95_ms"], 2),
                         fmt(r["p99_ms"], 2), errors, fmt(r.get("mean_batch")), fmt(r["client_cpu_cores"], 2),
                         fmt(r["server_cpu_cores"], 2)])
    print(f"\n### {kind}\n")
    print_table(["setting", "conc", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors", "mean batch", "client CPU",
                 "server CPU"], rows)
    pairs = [("ours/LitServe mbs=1", "ours mbs=1", "LitServe mbs=1"),
             ("ours/LitServe batched", "ours mbs=64/5ms", "LitServe mbs=64/5ms"),
             ("ours batched/mbs=1", "ours mbs=64/5ms", "ours mbs=1"),
             ("LitServe batched/mbs=1", "LitServe mbs=64/5ms", "LitServe mbs=1")]
    ratio_rows = []
    for c in concs:
        row = [c]
        for _, a, b in pairs:
            ra, rb = find(runs, a, c), find(runs, b, c)
            row.append(f"{ra['throughput'] / rb['throughput']:.2f}x" if ra and rb and rb["throughput"] else "-")
        ratio_rows.append(row)
    if any(cell != "-" for row in ratio_rows for cell in row[1:]):
        print()
        print_table(["conc"] + [name + " req/s" for name, _, _ in pairs], ratio_rows)


def check(name: str, value, target: str, ok) -> dict:
    return {"check": name, "value": value, "target": target, "pass": ok}


def targets(models: dict) -> list[dict]:
    out = []
    clf = models.get("classifier")
    if clf:
        ours, lit = find(clf["runs"], "ours mbs=64/5ms", 64), find(clf["runs"], "LitServe mbs=64/5ms", 64)
        raw = clf["raw"]["best_samples_per_s"]
        if ours:
            out.append(check("classifier c=64: ours batched / raw best batch", f"{ours['throughput'] / raw:.2f}x",
                             ">= 0.9x", ours["throughput"] >= 0.9 * raw))
        if ours and lit:
            out.append(check("classifier c=64: ours batched / LitServe batched",
                             f"{ours['throughput'] / lit['throughput']:.2f}x", ">= 1.1x",
                             ours["throughput"] >= 1.1 * lit["throughput"]))
            out.append(check("classifier c=64: p99 ours vs LitServe (ms)",
                             f"{ours['p99_ms']:.1f} vs {lit['p99_ms']:.1f}", "ours <= LitServe",
                             ours["p99_ms"] <= lit["p99_ms"]))
    mlp = models.get("mlp")
    if mlp:
        b, nb = find(mlp["runs"], "ours mbs=64/5ms", 64), find(mlp["runs"], "ours mbs=1", 64)
        if b and nb:
            out.append(check("mlp c=64: ours batched / ours mbs=1", f"{b['throughput'] / nb['throughput']:.2f}x",
                             ">= 4x", b["throughput"] >= 4 * nb["throughput"]))
            out.append(check("mlp c=64: p99 batched vs mbs=1 (ms)", f"{b['p99_ms']:.1f} vs {nb['p99_ms']:.1f}",
                             "batched <= mbs=1", b["p99_ms"] <= nb["p99_ms"]))
    triv = models.get("trivial")
    if triv:
        one = find(triv["runs"], "ours mbs=1", 1)
        if one:
            out.append(check("trivial c=1: p50 (ms)", f"{one['p50_ms']:.3f}", "<= 0.6", one["p50_ms"] <= 0.6))
        peaks = [r["throughput"] for r in triv["runs"].get("ours mbs=1", []) if "error" not in r]
        if peaks:
            out.append(check("trivial: peak req/s", f"{max(peaks):.0f}", ">= 2000", max(peaks) >= 2000))
    for kind in ("classifier", "mlp"):
        m = models.get(kind)
        b, nb = (find(m["runs"], "ours mbs=64/5ms", 1), find(m["runs"], "ours mbs=1", 1)) if m else (None, None)
        if b and nb:
            delay = b["p50_ms"] - nb["p50_ms"]
            out.append(check(f"{kind} c=1: p50 batched - p50 mbs=1 (ms)", f"{delay:+.2f}",
                             f"< {QUEUE_DELAY_MS / 2:g} (window {QUEUE_DELAY_MS} ms)", delay < QUEUE_DELAY_MS / 2))
    return out


def speeds(rows: list[dict]) -> str:
    return ", ".join(f"bs{r['batch']} {r['samples_per_s']:.0f} ({r['ms_per_call']:.2f})" for r in rows)


def run_models(args, scratch: Path, litserve_version, probes: dict) -> dict:
    """Raw speed, then every server setting under load, for each model of ``args.only``."""
    from deepseek.cli.bench import measure_raw

    models = {}
    for kind in args.only:
        probes[f"before {kind}"] = matmul_peak_gflops(n=512, seconds=1.0)
        print(f"\n# {kind} (probe {probes[f'before {kind}']:.0f} GFLOPS)")
        model = build_model(kind)
        scripted = torch.jit.script(model)
        batched_kinds = [False] if kind == "trivial" else [False, True]
        repos = {b: write_repository(scratch / f"{kind}-{'b' if b else 'nb'}", kind, scripted, b)
                 for b in batched_kinds}
        raw = measure_raw(repos[batched_kinds[-1]], kind, {}, VOCAB, seconds=2.0)
        eager = raw_eager(kind, sorted({1, raw["best_batch"]}))
        print(f"raw in-process, samples/s (ms/call): ours {speeds(raw['batches'])}; eager {speeds(eager)}; "
              f"best/bs1 {raw['gain_best_over_1']:.2f}x", flush=True)

        bodies = loadgen.build_kserve_bodies(metadata(kind), N_BODIES, seed=0, int_high=VOCAB)
        name, _ = INPUT_KEYS[kind]
        lit_bodies = [json.dumps({name: json.loads(b)["inputs"][0]["data"]}, separators=(",", ":")).encode()
                      for b in bodies]
        runs = {}
        for batched in batched_kinds:
            tag = "mbs=64/5ms" if batched else "mbs=1"
            port = free_port()
            runs[f"ours {tag}"] = run_setting(
                f"ours {tag}", [sys.executable, "-m", "deepseek.cli.main", "serve", "--model-repository",
                                str(repos[batched]), "--http-port", str(port), "--no-grpc"],
                f"http://127.0.0.1:{port}/v2/health/ready", f"http://127.0.0.1:{port}", f"/v2/models/{kind}/infer",
                bodies, b'"outputs"', 30.0, args, scratch / f"ours-{kind}-{tag[:5]}.log", model=kind)
            if litserve_version is not None:
                port = free_port()
                mbs, timeout = (64, QUEUE_DELAY_MS / 1000) if batched else (1, 0.0)
                runs[f"LitServe {tag}"] = run_setting(
                    f"LitServe {tag}", [sys.executable, str(LITSERVE), kind, str(mbs), str(timeout), str(port)],
                    f"http://127.0.0.1:{port}/health", f"http://127.0.0.1:{port}", "/predict", lit_bodies, b'"y"',
                    3.0, args, scratch / f"litserve-{kind}-{tag[:5]}.log")
        models[kind] = {"raw": raw, "raw_eager": eager, "runs": runs}
    return models


# -- main --------------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=float, default=15.0, help="measurement window per load, seconds")
    ap.add_argument("--warmup", type=float, default=3.0, help="warm-up per load, seconds (not counted)")
    ap.add_argument("--quick", action="store_true", help="5 s windows")
    ap.add_argument("--only", nargs="+", choices=list(MODELS), default=list(MODELS), help="models to run")
    ap.add_argument("--concurrency", nargs="+", type=int, default=list(CONCURRENCY))
    ap.add_argument("--no-litserve", action="store_true", help="skip the LitServe rows")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON output (default: benchmarks/results/bench_serve.json for a full run, "
                         "bench_serve_partial.json otherwise)")
    args = ap.parse_args()
    if args.quick:
        args.window = 5.0
    full = not args.quick and args.only == list(MODELS) and tuple(args.concurrency) == CONCURRENCY
    out = args.out or RESULTS_DIR / ("bench_serve.json" if full else "bench_serve_partial.json")

    litserve_version = None
    if not args.no_litserve:
        try:
            import litserve
            litserve_version = litserve.__version__
        except ImportError:
            print("LitServe is not installed: its rows are skipped (pip install litserve==0.2.19)")
    info = machine_info()
    info["litserve"] = litserve_version
    print_machine(info)
    t_start = time.perf_counter()
    probes = {"start": matmul_peak_gflops(n=512, seconds=1.0)}
    print(f"512x512 matmul probe: {probes['start']:.0f} GFLOPS")

    scratch = Path(tempfile.mkdtemp(prefix="bench_serve_"))  # repositories and server logs
    try:
        models = run_models(args, scratch, litserve_version, probes)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    probes["end"] = matmul_peak_gflops(n=512, seconds=1.0)
    print(f"\n512x512 matmul probe: start {probes['start']:.0f}, end {probes['end']:.0f} GFLOPS; "
          f"{(time.perf_counter() - t_start) / 60:.1f} min")
    for kind, m in models.items():
        print_model_tables(kind, m["runs"], args.concurrency)
        print(f"raw best batch {m['raw']['best_batch']}: {m['raw']['best_samples_per_s']:.1f} samples/s; "
              f"batch 1: {m['raw']['batch1_samples_per_s']:.1f}")
    checks = targets(models)
    if checks:
        print("\n### targets\n")
        print_table(["check", "value", "target", "result"],
                    [[c["check"], c["value"], c["target"], "PASS" if c["pass"] else "MISS"] for c in checks])
    data = {"machine": info, "probe_gflops_512": probes, "window_s": args.window, "warmup_s": args.warmup,
            "concurrency": args.concurrency, "full_run": full, "models": models, "targets": checks}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, default=str))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
