"""The fraud example served: the distilled INT8 student against the deep fp32 teacher, one ``ds serve`` process.

Repository: ``examples/fraud/run.py compress`` writes it (``--repository``, default runs/fraud/repository):
``fraud_teacher`` (6-layer LSTM + attention, ONNX fp32), ``fraud_student`` (2 layers, distilled, ONNX INT8 from
onnxruntime's dynamic quantization) and ``fraud_student_fp32`` (the same student before quantization); all onnx
backend with dynamic batching (max batch 64, 2 ms delay).
``--tiny`` builds a throw-away repository of untrained models of the same shapes instead (a smoke run: the
numbers of an untrained model time the same work).

Requests: one window per request (KServe v2 JSON, ``transactions`` FP32 [1, 16, 23]), the lean closed-loop
client of :mod:`deepseek.bench.loadgen`:

  single      1 connection: latency at batch 1 (p50 / p99)
  concurrent  ``--clients`` connections (64): throughput and latency when the dynamic batcher fills batches

Each round runs every (model, load) once, in a rotating order; rows per model call come from the server's
``ds_inference_batch_size`` histogram. Before the server starts, the three graphs are also timed alone in
onnxruntime (1 thread) at batch 1 and 64, interleaved: the model's own compute, without HTTP and JSON.

    python benchmarks/bench_fraud_serving.py                  # 3 rounds x 3 models x 2 loads x (3 + 10) s
    python benchmarks/bench_fraud_serving.py --tiny           # smoke: untrained models, 1 round of 0.5 + 1.5 s, 8 clients
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_load_arguments, start_repository_server, batched_load_rounds, interleaved, machine_info, median, print_machine, print_table,  # noqa: E402
                    setup_path, write_results)

setup_path()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))  # the example package `fraud`
MODELS = ("fraud_teacher", "fraud_student_fp32", "fraud_student")


def tiny_repository(root: Path) -> Path:
    """Untrained teacher (6 layers) and INT8 student (2 layers) of the example's shapes, exported and configured."""
    from fraud.features import N_FEATURES
    from fraud.model import FraudLSTM
    from fraud.serving import add_to_repository, export_model
    from fraud.training import WINDOW

    torch.manual_seed(0)
    repo = root / "repository"
    for name, layers, int8 in (("fraud_teacher", 6, False), ("fraud_student", 2, True)):
        exported = export_model(FraudLSTM(N_FEATURES, hidden=64, layers=layers), WINDOW, N_FEATURES, root / name,
                                int8=int8)
        add_to_repository(repo, name, root / name / ("model.int8.onnx" if int8 else "model.onnx"), exported["report"])
        if int8:
            add_to_repository(repo, name + "_fp32", root / name / "model.onnx", exported["report"])
    return repo


def request_bodies(n: int, window: int, features: int, seed: int = 0) -> list[bytes]:
    generator = torch.Generator().manual_seed(seed)
    bodies = []
    for _ in range(n):
        x = torch.randn(1, window, features, generator=generator)
        x[..., -1] = 1.0
        bodies.append(json.dumps({"inputs": [{"name": "transactions", "shape": list(x.shape), "datatype": "FP32",
                                              "data": [round(v, 4) for v in x.reshape(-1).tolist()]}]}).encode())
    return bodies


def compute_ms(repo: Path, window: int, features: int, rounds: int) -> dict[str, dict[int, float]]:
    """Median ms per onnxruntime call of each model's graph at batch 1 and 64 (1 thread, interleaved)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sessions = {m: ort.InferenceSession(str(repo / m / "1" / "model.onnx"), options,
                                        providers=["CPUExecutionProvider"]) for m in MODELS}
    cases = {}
    for batch in (1, 64):
        x = torch.randn(batch, window, features)
        x[..., -1] = 1.0
        feed = {"transactions": x.numpy()}
        for m, session in sessions.items():
            cases[f"{m}@{batch}"] = (lambda s=session, f=feed: s.run(None, f))
    times = interleaved(cases, rounds=rounds, warmup=3, inner={k: 20 if k.endswith("@1") else 4 for k in cases})
    return {m: {b: median(times[f"{m}@{b}"]) * 1e3 for b in (1, 64)} for m in MODELS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=Path("runs/fraud/repository"))
    add_load_arguments(parser, rounds=3, duration=10.0,
                       tiny_help="smoke run: untrained models, 8 clients, 0.5 + 1.5 s")
    args = parser.parse_args()
    if args.tiny:
        args.clients, args.rounds, args.warmup, args.duration = 8, 1, 0.5, 1.5
    info = machine_info()
    print_machine(info)
    from deepseek.bench import loadgen
    from fraud.features import N_FEATURES
    from fraud.training import WINDOW

    bodies = request_bodies(256, WINDOW, N_FEATURES)
    loads = {"single": 1, "concurrent": args.clients}
    results, calls = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-fraud-serving-") as tmp:
        repo = tiny_repository(Path(tmp)) if args.tiny else args.repository
        if not (repo / "fraud_student" / "config.yaml").is_file():
            raise SystemExit(f"{repo}: no fraud model repository; run `python examples/fraud/run.py compress` "
                             f"first, or pass --tiny")
        compute = compute_ms(repo, WINDOW, N_FEATURES, rounds=5 if args.tiny else 15)
        print_table(["model", "ms/call batch 1", "ms/call batch 64"],
                    [[m, f"{c[1]:.3f}", f"{c[64]:.3f}"] for m, c in compute.items()])
        server, url = start_repository_server(repo, args.torch_threads, tmp)
        try:
            for model in MODELS:
                results[model], calls[model] = batched_load_rounds(
                    url, f"/v2/models/{model}/infer", bodies, model=model, loads=loads, rounds=args.rounds,
                    warmup_s=args.warmup, duration_s=args.duration, server_pid=server.pid,
                    marker=b'"fraud_probability"')
        finally:
            loadgen.stop_server(server, grace_s=60)

    rows, summary = [], {}
    for model in MODELS:
        summary[model] = {}
        for load, rounds in results[model].items():
            med = lambda key: statistics.median(getattr(r, key) for r in rounds)  # noqa: E731
            summary[model][load] = {"req_per_s": med("throughput"), "p50_ms": med("p50_ms"), "p99_ms": med("p99_ms"),
                                    "errors": sum(r.error_count for r in rounds),
                                    "rows_per_call": statistics.median(calls[model][load])}
            s = summary[model][load]
            rows.append([model, f"{load} ({loads[load]})", f"{s['req_per_s']:.0f}", f"{s['p50_ms']:.2f}",
                         f"{s['p99_ms']:.2f}", f"{s['rows_per_call']:.1f}", s["errors"]])
    print_table(["model", "load (clients)", "req/s", "p50 ms", "p99 ms", "rows/call", "errors"], rows)
    write_results("bench_fraud_serving_tiny" if args.tiny else "bench_fraud_serving", {
        "machine": info, "clients": args.clients, "rounds": args.rounds, "warmup_s": args.warmup,
        "duration_s": args.duration, "torch_threads": args.torch_threads, "summary": summary,
        "onnxruntime_ms_per_call": compute,
        "results": {m: {load: [r.to_dict() for r in rs] for load, rs in res.items()} for m, res in results.items()}})


if __name__ == "__main__":
    main()
