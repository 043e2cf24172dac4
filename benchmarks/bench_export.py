"""Forward latency of an exported LM: eager torch fp32 vs onnxruntime fp32 vs onnxruntime int8 (dynamic).

Model: ``--model DIR`` (default ``runs/quickstart/model`` when it exists, else a freshly built ``small``
preset with seed 0). It is exported once with :func:`deepseek.export.export_onnx` (validated, plus the int8
graph), then every case runs a full forward (logits for every position) on the same token ids, batch 1 and 8
x 128 tokens, interleaved round by round; ratios are medians of the per-round ratios to eager. ORT gets the
same intra-op thread count as torch. Also prints max |ORT - eager| and the int8 graph's argmax agreement on
the timed inputs.

Both compute only the chosen experts: eager sorts (token, expert) pairs and runs torch._grouped_mm, the graph
gathers each expert's tokens (NonZero + Gather) and runs one MatMul per expert.

    python benchmarks/bench_export.py [--model DIR] [--rounds 9] [--threads 1] [--tokens 128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REPO_ROOT, interleaved, machine_info, median, paired_ratio, print_machine,  # noqa: E402
                    print_table, setup_path, spread, write_results)

setup_path()
import numpy as np  # noqa: E402
import torch  # noqa: E402

import deepseek as ds  # noqa: E402
from deepseek.export import export_onnx  # noqa: E402

DEFAULT_MODEL = REPO_ROOT / "runs" / "quickstart" / "model"


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help=f"model directory (default {DEFAULT_MODEL} if it "
                                                            f"exists, else a fresh `small` preset)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads of torch and ORT alike (1 is steadier on a shared host)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--budget", type=float, default=300.0, help="stop after this many seconds (>= 3 rounds)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = machine_info()
    print_machine(info)

    source = args.model or (DEFAULT_MODEL if DEFAULT_MODEL.is_dir() else None)
    if source is not None:
        model, _ = ds.load(source)
        label = str(source)
    else:
        torch.manual_seed(0)
        model = ds.MoETransformer(ds.preset("small"))
        label = "preset small (random weights, seed 0)"
    model.eval()
    cfg = model.config
    print(f"# model: {label}: {model.num_parameters():,} parameters, {cfg.n_routed_experts} experts top-{cfg.top_k}, "
          f"{cfg.n_layers} layers, d_model {cfg.d_model}")

    with tempfile.TemporaryDirectory() as tmp:
        report = export_onnx(model, Path(tmp) / "model.onnx", quantize_int8=True)
        fp32 = session(report.path, args.threads)
        int8 = session(Path(report.int8["path"]), args.threads)
        print(f"# export: fp32 {report.file_bytes / 2**20:.1f} MiB (max |ORT - eager| {report.max_abs_diff:.1e} "
              f"on the validation shapes), int8 {report.int8['file_bytes'] / 2**20:.1f} MiB")

        generator = torch.Generator().manual_seed(0)
        inputs = {b: torch.randint(0, cfg.vocab_size, (b, args.tokens), generator=generator) for b in args.batches}
        checks, cases = {}, {}
        for b, ids in inputs.items():
            feed = {"input_ids": ids.numpy()}
            with torch.inference_mode():
                eager = model(ids).numpy()
            a, q = fp32.run(None, feed)[0], int8.run(None, feed)[0]
            checks[b] = {"fp32_max_abs_diff": float(np.abs(a - eager).max()),
                         "int8_max_abs_diff": float(np.abs(q - eager).max()),
                         "int8_argmax_agreement": float((q.argmax(-1) == eager.argmax(-1)).mean())}

            def run_eager(ids=ids):
                with torch.inference_mode():
                    model(ids)

            cases[f"b{b}/eager fp32"] = run_eager
            cases[f"b{b}/ORT fp32"] = lambda feed=feed: fp32.run(None, feed)
            cases[f"b{b}/ORT int8"] = lambda feed=feed: int8.run(None, feed)

        times = interleaved(cases, rounds=args.rounds, warmup=2, budget_s=args.budget)
    n_rounds = len(next(iter(times.values())))

    rows, results = [], {}
    for b in args.batches:
        eager = times[f"b{b}/eager fp32"]
        for impl in ("eager fp32", "ORT fp32", "ORT int8"):
            ms = [1e3 * t for t in times[f"b{b}/{impl}"]]
            speedup = paired_ratio(eager, times[f"b{b}/{impl}"])
            rows.append([f"{b}x{args.tokens}", impl, spread(ms), f"{median(speedup):.2f}x",
                         f"{args.tokens * b / (median(ms) / 1e3):,.0f}"])
            results[f"b{b}/{impl}"] = {"ms": ms, "speedup_vs_eager": speedup}

    print(f"\nfull forward, {args.threads} threads, {n_rounds} interleaved rounds (median (min-max))")
    print_table(["batch x tokens", "impl", "ms", "eager / impl", "tokens/s"], rows)
    print("\nagreement with eager: " + "; ".join(
        f"b{b}: fp32 max |diff| {c['fp32_max_abs_diff']:.1e}, int8 max |diff| {c['int8_max_abs_diff']:.3f}, "
        f"int8 argmax {100 * c['int8_argmax_agreement']:.1f}%" for b, c in checks.items()))
    write_results("bench_export", dict(machine=info, model=label, tokens=args.tokens, batches=args.batches,
                                       rounds=n_rounds, fp32_bytes=report.file_bytes,
                                       int8_bytes=report.int8["file_bytes"], checks=checks, results=results))


if __name__ == "__main__":
    main()
