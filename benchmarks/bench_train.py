"""Whole-model training throughput: ours vs Hugging Face Mixtral with the same config and weights.

One training step = forward + cross-entropy + backward + AdamW step (default, non-fused: the same
optimizer for every case), batch 8 x 256 tokens, preset ``mixtral-tiny`` (the tiny Mixtral of
shared/reference/cpu-baseline.md: 17.57M parameters, 6.04M active without the embedding).

Cases, timed interleaved in one process (every case once per round, rotating order):
  hf-fp32             transformers.MixtralForCausalLM(labels=ids), default experts implementation
                      (grouped_mm), sdpa attention: the anchor
  ours-logits-fp32    deepseek MoETransformer returning logits + F.cross_entropy: the same work as HF
  ours-fp32           model(ids, targets=...): our training path, the loss without materialised logits
  ours-bf16           the same under torch.autocast("cpu", torch.bfloat16)
  ours-jit-fp32       ds.jit(model) (torch.compile, inductor), targets path
  ours-jit-bf16       ds.jit(model) under bf16 autocast, targets path
  hf-bf16             HF under bf16 autocast (for information: its grouped_mm experts stay fp32)

MFU = 6 * N_active * tokens/s / peak, with the fp32 and bf16 matmul peaks (2048^2) measured in this run.

    python benchmarks/bench_train.py [--rounds 8] [--no-jit] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (interleaved, machine_info, matmul_peak_gflops, median, paired_ratio, print_machine,  # noqa: E402
                    print_table, setup_path, spread, write_results)

setup_path()
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import deepseek as ds  # noqa: E402
from deepseek.hardware import bf16_products_fast, hardware_profile  # noqa: E402
from hf_anchor import hf_mixtral_from_ours  # noqa: E402

TARGETS = {"ours-fp32": ("hf-fp32", 1.2), "ours-bf16": ("hf-fp32", 2.5),
           "ours-jit-fp32": ("hf-fp32", 1.2), "ours-jit-bf16": ("hf-fp32", 2.5)}


def make_step(model, ids, targets, hf: bool, bf16: bool, fused_loss: bool = True):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            if hf:  # the idiomatic HF call: labels in, loss out (HF shifts the labels itself)
                loss = model(input_ids=ids, labels=ids).loss
            elif fused_loss:
                loss = model(ids, targets=targets)
            else:
                logits = model(ids)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        opt.step()
        return loss

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2, help="steps per measurement")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-jit", action="store_true", help="skip the torch.compile cases")
    ap.add_argument("--cases", nargs="+", default=None, help="only these cases (hf-fp32 is always run)")
    ap.add_argument("--budget", type=float, default=600.0, help="stop after this many seconds (>= 3 rounds)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print_machine(info)

    torch.manual_seed(0)
    cfg = ds.preset("mixtral-tiny")
    base = ds.MoETransformer(cfg)
    hf_base = hf_mixtral_from_ours(base)
    n_active = base.num_parameters(active=True, embedding=False)
    with torch.no_grad():  # same weights => same function (checked, not assumed)
        probe = torch.randint(0, cfg.vocab_size, (1, 64))
        logit_diff = (base.eval()(probe) - hf_base.eval()(probe).logits).abs().max().item()
    print(f"config mixtral-tiny: {base.num_parameters() / 1e6:.2f}M params, {n_active / 1e6:.2f}M active "
          f"(no embedding); max |logits ours - HF| = {logit_diff:.2e}")

    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    targets = torch.cat([ids[:, 1:], torch.full((args.batch, 1), -100)], dim=1)  # what HF's labels=ids computes
    tokens = args.batch * args.seq

    def ours(bf16, jit=False, fused_loss=True):
        m = copy.deepcopy(base).train()
        if jit:
            m = ds.jit(m)
        return make_step(m, ids, targets, hf=False, bf16=bf16, fused_loss=fused_loss)

    # The three loss paths agree before any step (same weights, same batch).
    losses = {"hf": make_step(copy.deepcopy(hf_base).train(), ids, targets, True, False)().item(),
              "ours-logits": ours(False, fused_loss=False)().item(), "ours": ours(False)().item()}
    print("first-step loss: " + ", ".join(f"{k} {v:.6f}" for k, v in losses.items()))

    cases = {
        "hf-fp32": make_step(copy.deepcopy(hf_base).train(), ids, targets, hf=True, bf16=False),
        "ours-logits-fp32": ours(False, fused_loss=False),
        "ours-fp32": ours(False),
    }
    # bf16 cases only where this CPU runs bf16 products fast: without native bf16 each step takes minutes
    bf16_here = bf16_products_fast(hardware_profile())
    if bf16_here:
        cases["ours-bf16"] = ours(True)
        cases["hf-bf16"] = make_step(copy.deepcopy(hf_base).train(), ids, targets, hf=True, bf16=True)
    else:
        print("bf16 cases skipped: this CPU has no fast bf16 products (ds info --hardware)")
    compile_s = {}
    if not args.no_jit:
        for name, bf16 in (("ours-jit-fp32", False), ("ours-jit-bf16", True)):
            if bf16 and not bf16_here:
                continue
            if args.cases and name not in args.cases:
                continue
            step = ours(bf16, jit=True)
            t0 = time.perf_counter()
            step(), step()  # compile (cold or warm inductor cache) happens here
            compile_s[name] = time.perf_counter() - t0
            cases[name] = step

    if args.cases:
        cases = {k: v for k, v in cases.items() if k == "hf-fp32" or k in args.cases}
    peak32 = matmul_peak_gflops(torch.float32)
    peak16 = matmul_peak_gflops(torch.bfloat16) if bf16_here else float("nan")
    times = interleaved(cases, rounds=args.rounds, warmup=2, inner=args.steps, budget_s=args.budget)
    peak32 = max(peak32, matmul_peak_gflops(torch.float32))  # again after: the host's speed drifts
    peak16 = max(peak16, matmul_peak_gflops(torch.bfloat16)) if bf16_here else float("nan")

    flops_per_token = 6 * n_active
    results = {}
    rows = []
    anchor = times["hf-fp32"]
    for name, ts in times.items():
        tps = [tokens / t for t in ts]
        ratio = paired_ratio(anchor, ts)  # > 1: faster than HF fp32
        mfu32 = median(tps) * flops_per_token / (peak32 * 1e9)
        mfu16 = median(tps) * flops_per_token / (peak16 * 1e9)
        target = ""
        if name in TARGETS:
            want = TARGETS[name][1]
            target = f">= {want}x: {'met' if median(ratio) >= want else 'MISSED'}"
        rows.append([name, spread(tps), f"{median(ratio):.2f}x ({min(ratio):.2f}-{max(ratio):.2f})",
                     f"{100 * mfu32:.1f}%", f"{100 * mfu16:.1f}%", target])
        results[name] = dict(tokens_per_s=tps, ratio_vs_hf_fp32=ratio, mfu_fp32_peak=mfu32, mfu_bf16_peak=mfu16)

    print(f"\nbatch {args.batch}x{args.seq} = {tokens} tokens/step, {len(anchor)} rounds x {args.steps} steps; "
          f"peaks: fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s (2048^2 matmul, this run)")
    print_table(["case", "tokens/s median (min-max)", "vs hf-fp32 (paired)", "MFU/fp32 peak", "MFU/bf16 peak",
                 "target"], rows)
    if compile_s:
        print("first two steps incl. compile: " + ", ".join(f"{k} {v:.1f}s" for k, v in compile_s.items()))
    write_results("bench_train", dict(machine=info, batch=args.batch, seq=args.seq, n_active=n_active,
                                      logit_diff_vs_hf=logit_diff, first_step_loss=losses, peak_fp32_gflops=peak32,
                                      peak_bf16_gflops=peak16, compile_s=compile_s, cases=results))


if __name__ == "__main__":
    main()
