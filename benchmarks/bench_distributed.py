"""Distributed training on this machine: gradient compression, and tokens/s from 1 to 2 processes.

Part 1, gradient communication (2 processes under ``torchrun --standalone``, DDP over gloo on CPU, NCCL on a
GPU): the ``small`` preset (~10M parameters) trains ``--steps`` steps on the standard library's json package
(byte tokens) with each gradient compression of ``deepseek.parallel.wrap_data_parallel``: none (fp32 bucketed
all-reduce), fp16 (``fp16_compress_hook``), powersgd (``powerSGD_hook``, rank 2, from iteration 2), and bf16
where the backend is NCCL. Per rank and step: bytes all-reduced (counted by wrapping ``dist.all_reduce``, which
the hooks call; for none, the gradient buckets' bytes), median step time, and the loss after the last step
(compression is lossy: same data, same seed, same initial weights in every run).

Part 2, scaling: the same ``ds train`` run (``small`` preset, fp32 ... bf16 per ``--precision``) as 1 process x
1 thread, 1 process x 2 threads and 2 processes x 1 thread (``--nproc 2``, same global batch): tokens/s from
metrics.jsonl (median of the logged windows after the first).

    python benchmarks/bench_distributed.py [--steps 30] [--skip-scaling]

Results go to benchmarks/results/bench_distributed.json; recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, machine_info, print_machine, print_table, setup_path, write_results  # noqa: E402

setup_path()
import torch  # noqa: E402

COMPRESSIONS = ["none", "fp16", "powersgd"]


# -- part 1: one rank of the gradient-compression run ---------------------------------------------------------

def comm_worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from deepseek.data import TokenLoader
    from deepseek.parallel import destroy, init_distributed, wrap_data_parallel
    from deepseek.models import MoETransformer, preset

    env = init_distributed(timeout_s=300)
    device = torch.device(f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu")
    counted = {"bytes": 0}
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *a, **kw):  # the compression hooks call dist.all_reduce
        counted["bytes"] += tensor.numel() * tensor.element_size()
        return real_all_reduce(tensor, *a, **kw)

    dist.all_reduce = counting_all_reduce
    torch.manual_seed(0)
    model = MoETransformer(preset("small", vocab_size=259)).to(device)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ddp = wrap_data_parallel(model, grad_compression=args.compression)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = TokenLoader(args.data, batch_size=16, seq_len=128, seed=0, rank=env.rank, world_size=env.world_size)
    times, loss = [], float("nan")
    for step in range(args.steps):
        batch = next(loader)
        counted["bytes"] = 0
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = ddp(batch.inputs.to(device), targets=batch.targets.to(device))
        out.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        loss_t = out.detach().clone()
        real_all_reduce(loss_t)
        loss = loss_t.item() / env.world_size
    sent = counted["bytes"] if args.compression != "none" else grad_bytes
    if env.rank == 0:
        Path(args.out).write_text(json.dumps({
            "compression": args.compression, "backend": dist.get_backend(), "bytes_per_step": sent,
            "grad_bytes": grad_bytes, "step_ms": 1000 * statistics.median(times[2:]), "final_loss": loss}))
    del ddp
    destroy()


def run_comm(compression: str, steps: int, data: Path, tmp: Path) -> dict:
    out = tmp / f"comm_{compression}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__, "--worker",
           "--compression", compression, "--steps", str(steps), "--data", str(data), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    return json.loads(out.read_text())


# -- part 2: tokens/s of ds train on 1 and 2 processes --------------------------------------------------------

def run_train(nproc: int, threads: int, steps: int, data: Path, run_dir: Path, precision: str) -> float:
    overrides = [f"run_dir={run_dir}", f"data.path={data}", f"max_steps={steps}", "batch_size=16",
                 "data.seq_len=256", f"precision={precision}", "device=cpu", "log_every=5", "eval_every=0",
                 "progress=false", "tensorboard=false", "checkpoint.every=0", "checkpoint.save_final=false",
                 "model.preset=small", "model.vocab_size=259"]
    config = run_dir.parent / "bench.yaml"
    config.write_text("seed: 0\n")
    cmd = [sys.executable, "-m", "deepseek.cli.main", "train", str(config), "--nproc", str(nproc), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]  # the first window holds warm-up
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compression", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return comm_worker(args)

    from deepseek.data import byte_tokenizer, prepare, python_stdlib_dir

    info = machine_info()
    print_machine(info)
    results: dict = {"machine": info, "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "data"
        prepare([str(python_stdlib_dir() / "json")], byte_tokenizer(), data, val_fraction=0.05, progress=False)
        compressions = COMPRESSIONS + (["bf16"] if torch.cuda.is_available() else [])
        comm = {c: run_comm(c, args.steps, data, tmp) for c in compressions}
        base = comm["none"]
        rows = [[c, r["backend"], f"{r['bytes_per_step'] / 2**20:.2f}", f"{base['bytes_per_step'] / r['bytes_per_step']:.1f}x",
                 f"{r['step_ms']:.0f}", f"{base['step_ms'] / r['step_ms']:.2f}x", f"{r['final_loss']:.4f}"]
                for c, r in comm.items()]
        print(f"\nGradient communication: small preset ({base['grad_bytes'] / 2**20:.1f} MiB of fp32 gradients), "
              f"2 ranks, {args.steps} steps, batch 16 x 128 per step")
        print_table(["compression", "backend", "MiB all-reduced / rank / step", "less traffic", "step ms (median)",
                     "speed-up", f"loss at step {args.steps}"], rows)
        results["comm"] = comm

        if not args.skip_scaling:
            layouts = [(1, 1), (1, 2), (2, 1)]
            rates = {f"{n} proc x {t} thread": run_train(n, t, args.steps, data, tmp / f"train_{n}x{t}", args.precision)
                     for n, t in layouts}
            one = rates["1 proc x 1 thread"]
            print(f"\nds train tokens/s: small preset, batch 16 x 256 (global), {args.precision}, {args.steps} steps")
            print_table(["layout", "tokens/s", "vs 1 proc x 1 thread"],
                        [[k, f"{v:.0f}", f"{v / one:.2f}x"] for k, v in rates.items()])
            results["scaling"] = rates
    path = write_results("bench_distributed", results)
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
