"""Top-k recommendation served by ``ds serve`` (torch backend, :mod:`deepseek.graph.serving`, dynamic batching):
latency p50/p99 and requests/s for one user per request, at 1 client and under 64 concurrent clients.

The served module scores one user against the whole catalogue (a [1, d] x [d, n_items] product), masks the
user's training items and takes the top k: its cost depends on the sizes only, so the benchmark serves the
trained embeddings of ``--run-dir`` (``python examples/graph/run.py train``) when they are there, else seeded
random tables of the example's size (2000 users, 1000 items, d = 64, ~18 training items per user).

    python benchmarks/bench_graph_serving.py                 # 2 rounds x 2 loads x (3 + 10) s
    python benchmarks/bench_graph_serving.py --tiny          # smoke run: 8 clients, 1 round of 0.5 + 2 s
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_load_arguments, load_batched_server, machine_info, print_machine, report_batched_rounds,  # noqa: E402
                    setup_path, write_results)


def build_repository(root: Path, run_dir: Path, users: int, items: int, dim: int, k: int) -> tuple[Path, int, str]:
    """(repository, number of users, where the embeddings came from)."""
    setup_path()
    import torch

    from deepseek.graph.serving import write_model_repository

    trained = run_dir / "hgt" / "embeddings.pt"
    data = run_dir / "data.pt"
    if trained.is_file() and data.is_file():
        tables = torch.load(trained, weights_only=True)
        split = torch.load(data, weights_only=True)["split"]
        seen: list[list[int]] = [[] for _ in range(tables["user_emb"].shape[0])]
        for u, i in zip(split["train_user"].tolist(), split["train_item"].tolist()):
            seen[u].append(i)
        write_model_repository(root, tables["user_emb"], tables["item_emb"], seen, k=k)
        return root, len(seen), str(trained)
    g = torch.Generator().manual_seed(0)
    seen = [torch.randperm(items, generator=g)[:18].tolist() for _ in range(users)]
    write_model_repository(root, 0.1 * torch.randn(users, dim, generator=g), 0.1 * torch.randn(items, dim, generator=g),
                           seen, k=k)
    return root, users, f"random tables {users} x {dim}, {items} x {dim}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/graph"))
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=10)
    add_load_arguments(parser, rounds=2, duration=10.0,
                       tiny_help="smoke run: 8 clients, 1 round of 0.5 + 2 s, 200 users")
    args = parser.parse_args()
    if args.tiny:
        args.clients, args.rounds, args.warmup, args.duration = 8, 1, 0.5, 2.0
        args.users, args.items, args.run_dir = 200, 100, Path("/nonexistent")
    info = machine_info()
    print_machine(info)
    with tempfile.TemporaryDirectory(prefix="bench-graph-serving-") as tmp:
        repo, n_users, source = build_repository(Path(tmp) / "repo", args.run_dir, args.users, args.items, args.dim,
                                                 args.k)
        print(f"# model: top-{args.k} over {source}; one user per request; {args.clients} clients vs 1")
        bodies = [json.dumps({"inputs": [{"name": "user_id", "shape": [1, 1], "datatype": "INT64",
                                          "data": [u % n_users]}]}).encode() for u in range(0, 7 * 512, 7)]
        results, calls = load_batched_server(
            ["--model-repository", str(repo)], "/v2/models/recommender/infer", bodies, model="recommender",
            loads={"single": 1, "concurrent": args.clients}, rounds=args.rounds, warmup_s=args.warmup,
            duration_s=args.duration, marker=b'"item_ids"', torch_threads=args.torch_threads, log_dir=Path(tmp))
    ratios, ratio, errors = report_batched_rounds(results, calls, "users/call")
    print(f"{args.clients} concurrent clients / 1 client: {ratio:.2f}x requests/s; errors: {errors}")
    write_results("bench_graph_serving_tiny" if args.tiny else "bench_graph_serving", {
        "machine": info, "source": source, "k": args.k, "clients": args.clients, "rounds": args.rounds,
        "warmup_s": args.warmup, "duration_s": args.duration, "torch_threads": args.torch_threads,
        "results": {name: [res.to_dict() for res in rounds] for name, rounds in results.items()},
        "ratios": ratios, "ratio_median": ratio, "users_per_call": calls, "errors": errors})


if __name__ == "__main__":
    main()
