"""The digits classifier served by ``ds serve`` with PNG bytes in (KServe v2 BYTES): latency at batch 1 and under
64 concurrent clients.

Model: examples/vision's ``ours-resnet`` from ``--run-dir`` (default runs/vision; ``run.py compress`` wrote its
ONNX graph), in the repository ``run.py serve`` builds: onnx backend, ``preprocess`` decoding PNG bytes with the
saved DeepseekImageProcessor, dynamic batching (``max_batch_size`` 64, ``max_queue_delay_ms`` 2). Without a run
(``--tiny``), an untrained network of the same architecture served through the torch backend (``model.pt2``):
that validates the benchmark, its latencies mean little.

Requests: one test digit per request as a PNG (the binary tensor extension: a JSON header padded to a fixed
length, then the 4-byte length and the PNG), cycled over the test images. Load: the lean closed-loop client
(:mod:`deepseek.bench.loadgen`) on raw keep-alive connections, in rounds, each load once per round:

  batch-1     1 connection: each request waits for the previous answer
  concurrent  ``--clients`` connections (64): the batcher joins what arrives together

    python benchmarks/bench_vision_serving.py                # 3 rounds x 2 loads x (3 + 15) s
    python benchmarks/bench_vision_serving.py --tiny         # a smoke run: 1 round of 0.5 + 2 s, 8 clients
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REPO_ROOT, add_load_arguments, start_repository_server, machine_info, print_machine, print_table, setup_path,  # noqa: E402
                    write_results)

setup_path()
MODEL = "digits"
HEADER_BYTES = 256  # every request's JSON header is padded to this length: one Inference-Header-Content-Length


def load_example():
    sys.path.insert(0, str(REPO_ROOT))
    spec = importlib.util.spec_from_file_location("vision_example.run", REPO_ROOT / "examples" / "vision" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def png_body(png: bytes) -> bytes:
    """A KServe v2 binary request: the JSON header (space-padded to HEADER_BYTES) + one BYTES element."""
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1],
                                     "parameters": {"binary_data_size": len(png) + 4}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": False}}]}).encode()
    if len(header) > HEADER_BYTES:
        raise ValueError(f"request header of {len(header)} bytes exceeds {HEADER_BYTES}")
    return header.ljust(HEADER_BYTES) + len(png).to_bytes(4, "little") + png


def repository(ex, run_dir: Path, tiny: bool, tmp: Path) -> tuple[Path, str]:
    """The repository to serve and what it holds."""
    if (run_dir / "onnx" / "model.onnx").is_file():
        return ex.sibling("serving").build_repository(run_dir), f"ONNX of {run_dir}/models/ours-resnet"
    if not tiny:
        raise SystemExit(f"{run_dir}/onnx/model.onnx is missing: run examples/vision/run.py prepare, train and "
                         f"compress first (or pass --tiny to validate the benchmark with an untrained network)")
    import torch

    ex.main(["prepare", "--run-dir", str(tmp), "--limit", "64"])
    torch.manual_seed(0)
    model = ex.DeepseekForImageClassification(ex.OURS["ours-resnet"]).eval()
    return ex.sibling("serving").build_repository(tmp, backend="torch", model=model), "untrained (torch backend)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=REPO_ROOT / "runs" / "vision")
    add_load_arguments(parser, rounds=3, duration=15.0, tiny_help="smoke run: 8 clients, 1 round of 0.5 + 2 s")
    args = parser.parse_args()
    if args.tiny:
        args.clients, args.rounds, args.warmup, args.duration = 8, 1, 0.5, 2.0
    from deepseek.bench import loadgen
    from deepseek.vision import encode_png

    info = machine_info()
    print_machine(info)
    ex = load_example()
    with tempfile.TemporaryDirectory(prefix="bench-vision-serving-") as tmp:
        repo, what = repository(ex, args.run_dir, args.tiny, Path(tmp) / "run")
        split = ex.digits_data.load(repo.parent)
        bodies = [png_body(encode_png(image)) for image in split["x_test"]]
        print(f"# model: {what}; {len(bodies)} one-PNG requests; 1 client vs {args.clients}")
        server, url = start_repository_server(repo, args.torch_threads, tmp)
        loads = {"batch-1": 1, "concurrent": args.clients}
        results: dict[str, list] = {name: [] for name in loads}
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(HEADER_BYTES)}
        try:
            for r in range(args.rounds):
                for name in list(loads)[r % 2:] + list(loads)[:r % 2]:  # rotate: no load always first
                    print(f"round {r + 1}/{args.rounds}: {name} ({loads[name]} client(s)) ...", flush=True)
                    results[name].append(loadgen.run_load(
                        url, f"/v2/models/{MODEL}/infer", bodies, concurrency=loads[name], warmup_s=args.warmup,
                        duration_s=args.duration, headers=headers, server_pid=server.pid, marker=b'"logits"',
                        label=name))
        finally:
            loadgen.stop_server(server, grace_s=60)
    rows = [[name, i + 1, f"{res.throughput:.1f}", f"{res.p50_ms:.2f}", f"{res.p99_ms:.2f}", res.error_count,
             f"{res.server_cpu_cores or 0:.2f}"] for name, rounds in results.items() for i, res in enumerate(rounds)]
    print_table(["load", "round", "req/s", "p50 ms", "p99 ms", "errors", "server CPU"], rows)
    summary = {name: {"p50_ms": statistics.median(r.p50_ms for r in rounds),
                      "p99_ms": statistics.median(r.p99_ms for r in rounds),
                      "req_per_s": statistics.median(r.throughput for r in rounds)} for name, rounds in results.items()}
    errors = sum(r.error_count for rounds in results.values() for r in rounds)
    print(f"medians over rounds: {json.dumps(summary)}; errors: {errors}")
    write_results("bench_vision_serving_tiny" if args.tiny else "bench_vision_serving", {
        "machine": info, "model": what, "clients": args.clients, "rounds": args.rounds, "warmup_s": args.warmup,
        "duration_s": args.duration, "torch_threads": args.torch_threads, "summary": summary, "errors": errors,
        "results": {name: [res.to_dict() for res in rounds] for name, rounds in results.items()}})


if __name__ == "__main__":
    main()
