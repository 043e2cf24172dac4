"""Does ``ds profile train`` tell the truth? Its MFU against docs/benchmarks.md's hand computation, and its overhead.

The case is bench_trainer.py's ``small`` (the quickstart's model, batch 16 x 256, AdamW, dynamic clipping; its
``train_config``, ``data_dir``, ``bare_loop`` and ``n_active`` are imported, not copied), at 1 and 2 threads, in each
precision asked for. Per case, in one process:

- **ours**: :func:`deepseek.ops.profile_train.profile_train` (what ``ds profile train`` runs): its ``mfu_6n``
  (6 · N_active · tokens/s from its plain steps ÷ the peak it measured) and its ``overhead`` (median over cycles of
  profiled ÷ plain step time − 1);
- **anchor** (the hand computation of docs/benchmarks.md): the bare loop a user writes by hand on the same config,
  timed with ``time.perf_counter`` (steps before and after the profile; median), N_active counted by
  bench_trainer's ``n_active``, the peak by ``common.matmul_peak_gflops`` (2048², best of bursts before and after).

Ratio = ours ÷ anchor MFU (target within 10 %, i.e. 0.90-1.10); overhead target <= 5 %. The trainer's own overhead
over the bare loop (<= 5 %, docs/benchmarks.md) is inside that ratio: it is a real cost of ``ds train``'s step.

    python benchmarks/bench_profile.py [--threads 1 2] [--precisions fp32 bf16] [--steps 8] [--bare-steps 8]
    python benchmarks/bench_profile.py --tiny     # a seconds-long check of the script itself (tiny preset)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trainer import bare_loop, data_dir, n_active, train_config  # noqa: E402
from common import machine_info, matmul_peak_gflops, print_machine, print_table, setup_path, write_results  # noqa: E402

setup_path()
import torch  # noqa: E402

from deepseek.data import TokenDataset  # noqa: E402
from deepseek.ops.profile_train import profile_train  # noqa: E402
from deepseek.train.config import load_train_config  # noqa: E402
from deepseek.train.lm import build_model, make_loader  # noqa: E402

MFU_TOLERANCE, OVERHEAD_TARGET = 0.10, 0.05
TINY = ["model.preset=tiny", "batch_size=4", "data.seq_len=64"]


def bare_step_seconds(cfg, tokenizer, steps: int, bf16: bool) -> list[float]:
    """Seconds per step of the hand-written loop on ``cfg``'s model and batches (one warm-up step first)."""
    model = build_model(cfg, tokenizer)
    loader = make_loader(cfg)
    batches = [(b.inputs, b.targets) for b in (loader.next_batch() for _ in range(steps + 1))]
    step = bare_loop(model, batches, bf16, hf=False)
    step(1)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(1)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--precisions", nargs="+", default=None, choices=["fp32", "bf16"],
                    help="default: fp32, and bf16 where this CPU runs bf16 products fast")
    ap.add_argument("--steps", type=int, default=None, help="profiled steps, each paired with a plain one "
                                                            "(default 8; --tiny: 2)")
    ap.add_argument("--bare-steps", type=int, default=None, help="hand-loop steps before and after the profile "
                                                                 "(default 8; --tiny: 2)")
    ap.add_argument("--tiny", action="store_true", help="validate the script on the tiny preset in seconds")
    args = ap.parse_args()
    if args.precisions is None:
        from deepseek.hardware import bf16_products_fast, hardware_profile
        args.precisions = ["bf16", "fp32"] if bf16_products_fast(hardware_profile()) and not args.tiny else ["fp32"]
    args.steps = args.steps or (2 if args.tiny else 8)
    args.bare_steps = args.bare_steps or (2 if args.tiny else 8)
    warnings.filterwarnings("ignore", message=".*Profiler clears events.*")
    scratch = Path(tempfile.mkdtemp(prefix="bench_profile_"))
    data, data_note = data_dir(scratch)
    tokenizer = TokenDataset(data, "train").tokenizer()
    rows, results = [], {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        info = machine_info()
        print_machine(info)
        print(f"data: {data_note}")
        for precision in args.precisions:
            bf16 = precision == "bf16"
            dtype = torch.bfloat16 if bf16 else torch.float32
            _, overrides = train_config("small", precision, data, scratch / f"run-{precision}-{threads}", 10_000)
            cfg = load_train_config(None, overrides + (TINY if args.tiny else []))
            peak = matmul_peak_gflops(dtype) * 1e9
            bare = bare_step_seconds(cfg, tokenizer, args.bare_steps, bf16)
            profiled = profile_train(cfg, steps=args.steps, warmup=2, out=scratch / f"profile-{precision}-{threads}")
            bare += bare_step_seconds(cfg, tokenizer, args.bare_steps, bf16)
            peak = max(peak, matmul_peak_gflops(dtype) * 1e9)  # again after: the host's speed drifts
            result = profiled.result
            tokens = result["tokens_per_step"]
            n = n_active(build_model(cfg, tokenizer))
            hand_tps = tokens / statistics.median(bare)
            hand_mfu = 6 * n * hand_tps / peak
            ratio = result["mfu_6n"] / hand_mfu
            case = f"small {precision} {threads} thr" if not args.tiny else f"tiny {precision} {threads} thr"
            results[case] = dict(n_active_ours=result["n_active_params"], n_active_hand=n,
                                 tokens_per_s_ours=result["tokens_per_s"], tokens_per_s_hand=hand_tps,
                                 peak_ours=result["peaks"]["matmul_flops"][precision], peak_hand=peak,
                                 mfu_ours=result["mfu_6n"], mfu_ours_with_attention=result["mfu"], mfu_hand=hand_mfu,
                                 mfu_ratio=ratio, overhead=result["overhead"],
                                 overhead_per_cycle=result["overhead_per_cycle"], breakdown=result["breakdown"],
                                 machine=info)
            rows.append([case, f"{result['tokens_per_s']:.0f} / {hand_tps:.0f}",
                         f"{result['peaks']['matmul_flops'][precision] / 1e9:.0f} / {peak / 1e9:.0f}",
                         f"{100 * result['mfu_6n']:.1f}% / {100 * hand_mfu:.1f}%",
                         f"{ratio:.3f} ({'met' if abs(ratio - 1) <= MFU_TOLERANCE else 'missed'})",
                         f"{100 * result['overhead']:.1f}% ({'met' if result['overhead'] <= OVERHEAD_TARGET else 'missed'})"])
    print()
    print_table(["case", "tokens/s ours / hand", "peak GFLOP/s ours / hand", "MFU (6N) ours / hand",
                 "MFU ratio (target 0.90-1.10)", "profiler overhead (target <= 5%)"], rows)
    write_results("bench_profile" + ("_tiny" if args.tiny else ""), dict(steps=args.steps, bare_steps=args.bare_steps,
                                                                       cases=results))


if __name__ == "__main__":
    main()
