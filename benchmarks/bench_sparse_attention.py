"""Sliding-window + global-token attention at long context: blocked kernel vs the dense masked reference.

What is measured: the whole model forward (preset ``mixtral-tiny``, max_seq_len 16384, fp32, batch 1,
``torch.inference_mode``) at 4k and 16k tokens — the most honest view, since it is what a user runs.

  sparse        attention="sparse" (window 256, 4 global tokens), blocked kernel: O(T * window) memory
  dense-mask    the same model with each layer's attention swapped for the reference
                ``dense_local_global_attention``: SDPA under the explicit [T, T] local+global mask
                (same function: the logits are checked equal)
  causal-flash  for information only: attention="dense", plain causal SDPA (flash kernel, no [T, T]
                matrix) — a *different* model (every token sees all previous ones)

Time: interleaved rounds in this process. Peak memory: each case once in a fresh subprocess, which
reports the RSS high-water mark; "case peak" = high-water mark minus the RSS just before the forward
(imports, weights and inputs already resident), i.e. what the forward itself needed. Memory is taken
twice: with all logits (the [T, 8192] fp32 logits alone are 512 MiB at 16k, the same for every variant)
and as a prefill that keeps only the last position's logits (``logits_to_keep=1``), which isolates what
attention changes. Targets: case peak at 16k <= 1/3 of dense-mask; time(16k)/time(4k) near 4 (linear).

    python benchmarks/bench_sparse_attention.py [--rounds 3] [--lengths 4096 16384]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (interleaved, machine_info, measure_in_subprocess, median, peak_rss_kib, print_machine,  # noqa: E402
                    print_table, rss_now_kib, setup_path, spread, write_results)

setup_path()
import torch  # noqa: E402

import deepseek as ds  # noqa: E402
import deepseek.nn.attention as attention_module  # noqa: E402
from deepseek.nn.sparse_attention import dense_local_global_attention  # noqa: E402

VARIANTS = ("sparse", "dense-mask", "causal-flash")


@contextlib.contextmanager
def dense_reference():
    """Swap the blocked kernel for the O(T^2) masked reference inside every Attention layer."""
    blocked = attention_module.blocked_local_global_attention
    attention_module.blocked_local_global_attention = dense_local_global_attention
    try:
        yield
    finally:
        attention_module.blocked_local_global_attention = blocked


def build(variant: str, max_len: int):
    torch.manual_seed(0)
    kind = "dense" if variant == "causal-flash" else "sparse"
    cfg = ds.preset("mixtral-tiny", max_seq_len=max_len, attention=kind, window=256, n_global_tokens=4)
    return ds.MoETransformer(cfg).eval()


def forward(model, ids, variant: str, logits_to_keep: int = 0):
    with torch.inference_mode(), (dense_reference() if variant == "dense-mask" else contextlib.nullcontext()):
        return model(ids, logits_to_keep=logits_to_keep)


def child(variant: str, length: int, logits_to_keep: int) -> None:
    """One forward in a fresh process; prints its memory as JSON."""
    model = build(variant, max(length, 2048))
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(1))
    before = rss_now_kib()
    start = time.perf_counter()
    forward(model, ids, variant, logits_to_keep)
    seconds = time.perf_counter() - start
    print(json.dumps(dict(rss_before_kib=before, peak_rss_kib=peak_rss_kib(), seconds=seconds)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--budget", type=float, default=400.0, help="stop timing after this many seconds (>= 3 rounds)")
    ap.add_argument("--child", nargs=3, metavar=("VARIANT", "LENGTH", "KEEP"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    info = machine_info()
    print_machine(info)
    max_len = max(args.lengths)

    # Memory first, each case alone in its own process.
    memory, prefill_memory = {}, {}
    for length in args.lengths:
        for variant in VARIANTS:
            extra = ["--threads", str(args.threads)] if args.threads else []
            memory[(variant, length)] = measure_in_subprocess(__file__, ["--child", variant, str(length), "0"] + extra)
            prefill_memory[(variant, length)] = measure_in_subprocess(
                __file__, ["--child", variant, str(length), "1"] + extra)

    models = {v: build(v, max_len) for v in VARIANTS}
    models["dense-mask"].load_state_dict(models["sparse"].state_dict())
    inputs = {n: torch.randint(0, 8192, (1, n), generator=torch.Generator().manual_seed(1)) for n in args.lengths}
    check_len = min(args.lengths)
    diff = (forward(models["sparse"], inputs[check_len], "sparse")
            - forward(models["dense-mask"], inputs[check_len], "dense-mask")).abs().max().item()

    cases = {f"{v}/{n}": (lambda v=v, n=n: forward(models[v], inputs[n], v)) for n in args.lengths for v in VARIANTS}
    times = interleaved(cases, rounds=args.rounds, warmup=1, budget_s=args.budget)
    n_rounds = len(next(iter(times.values())))

    rows, results = [], {}
    first, last = args.lengths[0], args.lengths[-1]
    def mib(mem):
        return (mem["peak_rss_kib"] - mem["rss_before_kib"]) / 1024 if "error" not in mem else float("nan")

    for variant in VARIANTS:
        row = [variant]
        for n in args.lengths:
            mem, pre = memory[(variant, n)], prefill_memory[(variant, n)]
            row += [spread(times[f"{variant}/{n}"]), f"{mib(mem):.0f}", f"{mib(pre):.0f}"]
            results[f"{variant}/{n}"] = dict(seconds=times[f"{variant}/{n}"], memory=mem, case_peak_mib=mib(mem),
                                             prefill_memory=pre, prefill_case_peak_mib=mib(pre))
        growth = [b / a for a, b in zip(times[f"{variant}/{first}"], times[f"{variant}/{last}"])]
        row.append(f"{median(growth):.2f}")
        results[f"{variant}/growth"] = growth
        rows.append(row)

    def case_mib(v, n):
        return results[f"{v}/{n}"]["case_peak_mib"]

    mem_ratio = case_mib("sparse", last) / case_mib("dense-mask", last)
    prefill_ratio = (results[f"sparse/{last}"]["prefill_case_peak_mib"]
                     / results[f"dense-mask/{last}"]["prefill_case_peak_mib"])
    growth = median(results["sparse/growth"])
    print(f"\nwhole-model forward, batch 1, fp32, inference_mode; {n_rounds} interleaved rounds; "
          f"memory = RSS high-water mark in a fresh process minus RSS before the forward (MiB)")
    headers = ["variant"]
    for n in args.lengths:
        headers += [f"{n} tok s", f"{n} MiB all logits", f"{n} MiB prefill"]
    print_table(headers + [f"time({last})/time({first})"], rows)
    print(f"\nmax |logits sparse - dense-mask| at {check_len} tokens: {diff:.2e}")
    print(f"target: sparse case peak at {last} <= 1/3 of dense-mask: all logits {mem_ratio:.3f} "
          f"{'met' if mem_ratio <= 1 / 3 else 'MISSED'}, prefill {prefill_ratio:.3f} "
          f"{'met' if prefill_ratio <= 1 / 3 else 'MISSED'}; time growth {growth:.2f} "
          f"for {last / first:.0f}x tokens ({'linear' if growth <= 1.25 * last / first else 'super-linear'})")
    for (variant, n), mem in list(memory.items()) + list(prefill_memory.items()):
        if "error" in mem:
            print(f"  memory run {variant}/{n} failed: {mem['error']}")
    write_results("bench_sparse_attention", dict(machine=info, rounds=n_rounds, logit_diff=diff,
                                                 memory_ratio_last=mem_ratio,
                                                 prefill_memory_ratio_last=prefill_ratio, time_growth=growth,
                                                 cases=results))


if __name__ == "__main__":
    main()
