"""Multi-LoRA mixing: one D x D linear with K adapters of rank R, rows of a batch on different adapters.

Cases (outputs checked equal first), timed interleaved in one process run, fp32, inference mode:
  base      the frozen linear alone (the floor)
  gathered  MultiLoRALinear.gathered: each row's A/B gathered, two bmm (vLLM's BGMV shape)
  grouped   rows grouped per adapter on the host, one low-rank product per group (SGMV-like; host sync)
  stacked   MultiLoRALinear.forward: all adapters' A at once, other adapters' columns masked, all B at once

    python benchmarks/bench_multi_lora.py [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from deepseek.nn.multi_lora import MultiLoRALinear

CASES = [(1024, 16, 1, 4, 16), (1024, 16, 1, 2, 16), (2048, 16, 1, 4, 64), (1024, 1, 256, 1, 16), (1024, 4, 64, 4, 16)]


def grouped(layer: MultiLoRALinear, x: torch.Tensor) -> torch.Tensor:
    y = layer.base_layer(x)
    ids, out = layer.row_ids, y.clone()
    for k in torch.unique(ids).tolist():  # the groups, sized on the host
        if k >= 0:
            rows = (ids == k).nonzero().squeeze(1)
            out[rows] = y[rows] + (x[rows] @ layer.lora_A[k].t()) @ layer.lora_B[k].t() * layer.scaling[k]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)\n")
    print("| D | rows x tokens | K | R | base µs | gathered µs | grouped µs | stacked µs |\n|---|---|---|---|---|---|---|---|")
    for D, B, T, K, R in CASES:
        layer = MultiLoRALinear(torch.nn.Linear(D, D, bias=False), [str(i) for i in range(K)], R)
        layer.lora_A.normal_()
        layer.lora_B.normal_()
        layer.scaling.fill_(1.0)
        layer.row_ids = torch.arange(B) % (K + 1) - 1  # the base and every adapter in turn
        x = torch.randn(B, T, D)
        fns = {"base": layer.base_layer, "gathered": layer.gathered, "grouped": lambda x: grouped(layer, x),
               "stacked": layer}
        times = {name: [] for name in fns}
        with torch.inference_mode():
            for name in ("gathered", "grouped"):
                torch.testing.assert_close(fns[name](x), layer(x), rtol=1e-4, atol=1e-3)
            n = 50 if T == 1 else 10
            for _ in range(5):  # rounds, each case in turn
                for name, fn in fns.items():
                    fn(x)
                    start = time.perf_counter()
                    for _ in range(n):
                        fn(x)
                    times[name].append((time.perf_counter() - start) / n * 1e6)
        best = {name: min(ts) for name, ts in times.items()}
        print(f"| {D} | {B} x {T} | {K} | {R} | " + " | ".join(f"{best[n]:.0f}" for n in fns) + " |")


if __name__ == "__main__":
    main()
