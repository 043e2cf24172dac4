"""Compression of the quickstart model: every method against the original, in one run.

    python benchmarks/bench_compress.py                       # all methods on runs/quickstart/model
    python benchmarks/bench_compress.py --methods int8-dynamic int4-weight --rounds 9

Each method goes through ``deepseek.compress.pipeline.compress`` (what ``ds compress`` runs), then
``deepseek.compress.report.compare`` times the compressed directory against the original in alternating rounds
(forward latency at batch 1 and 8 x 128 tokens, greedy decoding tokens/s) and scores validation perplexity on
the quickstart's held-out stdlib files. Targets (issue 6): int8 <= 0.30x bytes, <= 0.70x latency at batch 1,
perplexity +<= 3 %; int4 <= 0.20x bytes; QAT int8 perplexity +<= 1 %; 30 % channel pruning + short fine-tune
>= 25 % fewer parameters at perplexity +<= 5 %.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import machine_info, missing_model, print_machine, print_table, setup_path, write_results

setup_path()

import torch  # noqa: E402

from deepseek.compress.pipeline import compress  # noqa: E402
from deepseek.compress.report import compare, write_report  # noqa: E402

# method -> (options, fine-tuning steps, learning rate)
PLANS = {
    "int8-dynamic": ({}, 0, 0.0),
    "int8-weight": ({}, 0, 0.0),
    "int4-weight": ({"group_size": 32}, 0, 0.0),
    "qat": ({"scheme": "int8-dynamic"}, 100, 1e-4),
    "qat-int4": ({"scheme": "int4-weight"}, 100, 1e-4),
    "prune-unstructured": ({"sparsity": 0.3, "scope": "global"}, 0, 0.0),
    "prune-channels": ({"ratio": 0.3, "heads": True}, 200, 1e-3),
    "prune-experts": ({"keep": 6, "mode": "merge"}, 100, 5e-4),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/quickstart/model")
    parser.add_argument("--data", default="runs/quickstart/data")
    parser.add_argument("--out", default="runs/compress-bench", help="where the compressed directories go")
    parser.add_argument("--methods", nargs="+", default=list(PLANS), choices=list(PLANS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every fine-tune's steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="auto", help="fine-tuning precision (auto: bf16 only where it is fast)")
    args = parser.parse_args()
    if missing_model(args.model, "--model/--data"):
        return
    torch.set_num_threads(args.threads)
    info = machine_info()
    print_machine(info)

    results, rows = {}, []
    for name in args.methods:
        options, steps, lr = PLANS[name]
        method = "qat" if name.startswith("qat") else name
        steps = max(1, int(steps * args.steps_scale)) if steps else 0
        out = Path(args.out) / name
        started = time.perf_counter()
        training = dict(data=args.data, steps=steps, lr=lr, batch_size=16, seq_len=256, precision=args.precision,
                        run_dir=Path(args.out) / f"{name}.run")
        written, summary = compress(args.model, out, method, training=training, **options)
        seconds = time.perf_counter() - started
        print(f"\n{name}: {summary} ({seconds:.0f} s)")
        report = compare(args.model, written, data=args.data, rounds=args.rounds, progress=False)
        write_report(report, written)
        ratios = report.ratios()
        record = json.loads((written / "compression.json").read_text())
        results[name] = {**report.to_dict(), "compress_seconds": seconds, "steps": steps, "lr": lr,
                         "options": options, "details": {k: v for k, v in record.items() if k != "previous"}}
        c, o = report.compressed, report.original
        rows.append([name, f"{c.parameters:,}", f"{ratios['parameters']:.3f}", f"{ratios['bytes']:.3f}",
                     f"{c.latency_b1_ms:.1f} / {o.latency_b1_ms:.1f}", f"{ratios['latency_b1_ms']:.3f}",
                     f"{ratios['latency_b8_ms']:.3f}", f"{ratios['decode_tokens_per_s']:.3f}",
                     f"{c.val_ppl:.2f} / {o.val_ppl:.2f}", f"{(ratios['val_ppl'] - 1) * 100:+.2f} %", steps])
    print()
    print_table(["method", "parameters", "params x", "bytes x", "latency b1 ms (ours / orig)", "b1 x", "b8 x",
                 "decode tok/s x", "val ppl (ours / orig)", "ppl change", "fine-tune steps"], rows)
    write_results("compress", {"machine": info, "model": args.model, "data": args.data, "rounds": args.rounds,
                               "results": results})


if __name__ == "__main__":
    main()
