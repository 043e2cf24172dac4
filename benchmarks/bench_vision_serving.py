"""The digits classifier served by ``ds serve`` with PNG bytes in (KServe v2 BYTES): latency at batch 1 and under
64 concurrent clients, for the fp32 ONNX model (``digits``) and its QAT int8 ONNX twin (``digits-int8``).

Models: examples/vision's ``ours-resnet`` from ``--run-dir`` (default runs/vision; ``run.py compress`` wrote both
ONNX graphs), in the repository ``run.py serve`` builds: onnx backend, ``preprocess`` decoding PNG bytes with the
saved DeepseekImageProcessor, dynamic batching (``max_batch_size`` 64, ``max_queue_delay_ms`` 2). Without a run
(``--tiny``), an untrained network of the same architecture, exported the same way (fp32, and post-training
static int8 instead of QAT): that validates the benchmark, its latencies mean little.

Requests: one test digit per request as a PNG (the binary tensor extension: a JSON header padded to a fixed
length, then the 4-byte length and the PNG), cycled over the test images. Load: the lean closed-loop client
(:mod:`deepseek.bench.loadgen`) on raw keep-alive connections, in rounds, each (model, load) once per round in
a rotating order, against one server holding both models:

  batch-1     1 connection: each request waits for the previous answer
  concurrent  ``--clients`` connections (64): the batcher joins what arrives together

    python benchmarks/bench_vision_serving.py                        # 3 rounds x 2 models x 2 loads x (3 + 15) s
    python benchmarks/bench_vision_serving.py --models digits-int8   # one model only
    python benchmarks/bench_vision_serving.py --tiny                 # a smoke run: 1 round of 0.5 + 2 s, 8 clients
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
MODELS = ("digits", "digits-int8")
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
    """The repository to serve (both models) and what it holds."""
    serving = ex.sibling("serving")
    if all((run_dir / file).is_file() for file in serving.ONNX_FILES.values()):
        return serving.build_repository(run_dir), f"ONNX fp32 and QAT int8 of {run_dir}/models/ours-resnet"
    if not tiny:
        raise SystemExit(f"{run_dir}/onnx/model.onnx or onnx-int8/model.onnx is missing: run "
                         f"examples/vision/run.py prepare, train and compress first (or pass --tiny to validate "
                         f"the benchmark with an untrained network)")
    import torch

    from deepseek.compress.static_int8 import quantize_static_int8
    from deepseek.export import export_onnx, export_static_int8_onnx

    ex.main(["prepare", "--run-dir", str(tmp), "--limit", "64"])
    torch.manual_seed(0)
    model = ex.DeepseekForImageClassification(ex.OURS["ours-resnet"]).eval()
    images = ex.tensors(tmp)["x_train"]
    names = {"input_names": ["pixel_values"], "output_names": ["logits"]}
    export_onnx(model, tmp / serving.ONNX_FILES["digits"], example_inputs=(images[:2],), **names)
    int8 = quantize_static_int8(model, images.split(16), images[:1], compile=False)
    export_static_int8_onnx(int8, tmp / serving.ONNX_FILES["digits-int8"], (images[:2],), **names)
    return serving.build_repository(tmp), "untrained, fp32 and post-training int8 ONNX"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=REPO_ROOT / "runs" / "vision")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    add_load_arguments(parser, rounds=3, duration=15.0, tiny_help="smoke run: 8 clients, 1 round of 0.5 + 2 s")
    args = parser.parse_args()
    models = args.models.split(",")
    if not models or any(m not in MODELS for m in models):
        raise SystemExit(f"--models: choose from {', '.join(MODELS)} (got {args.models!r})")
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
        print(f"# models: {', '.join(models)} ({what}); {len(bodies)} one-PNG requests; 1 client vs {args.clients}")
        server, url = start_repository_server(repo, args.torch_threads, tmp)
        loads = {"batch-1": 1, "concurrent": args.clients}
        cases = [(model, load) for model in models for load in loads]
        results: dict[tuple[str, str], list] = {case: [] for case in cases}
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(HEADER_BYTES)}
        try:
            for r in range(args.rounds):
                shift = r % len(cases)
                for model, load in cases[shift:] + cases[:shift]:  # rotate: no case always first
                    print(f"round {r + 1}/{args.rounds}: {model} {load} ({loads[load]} client(s)) ...", flush=True)
                    results[model, load].append(loadgen.run_load(
                        url, f"/v2/models/{model}/infer", bodies, concurrency=loads[load], warmup_s=args.warmup,
                        duration_s=args.duration, headers=headers, server_pid=server.pid, marker=b'"logits"',
                        label=f"{model} {load}"))
        finally:
            loadgen.stop_server(server, grace_s=60)
    rows = [[model, load, i + 1, f"{res.throughput:.1f}", f"{res.p50_ms:.2f}", f"{res.p99_ms:.2f}", res.error_count,
             f"{res.server_cpu_cores or 0:.2f}"] for (model, load), rounds in results.items()
            for i, res in enumerate(rounds)]
    print_table(["model", "load", "round", "req/s", "p50 ms", "p99 ms", "errors", "server CPU"], rows)
    summary = {f"{model} {load}": {"p50_ms": statistics.median(r.p50_ms for r in rounds),
                                   "p99_ms": statistics.median(r.p99_ms for r in rounds),
                                   "req_per_s": statistics.median(r.throughput for r in rounds)}
               for (model, load), rounds in results.items()}
    errors = sum(r.error_count for rounds in results.values() for r in rounds)
    print(f"medians over rounds: {json.dumps(summary)}; errors: {errors}")
    write_results("bench_vision_serving_tiny" if args.tiny else "bench_vision_serving", {
        "machine": info, "model": what, "models": models, "clients": args.clients, "rounds": args.rounds, "warmup_s": args.warmup,
        "duration_s": args.duration, "torch_threads": args.torch_threads, "summary": summary, "errors": errors,
        "results": {f"{model} {load}": [res.to_dict() for res in rounds]
                    for (model, load), rounds in results.items()}})


if __name__ == "__main__":
    main()
