"""Graph recommendation, end to end: prepare -> train -> evaluate -> compress -> serve -> query.

    python examples/graph/run.py prepare                 # synthetic user-item-category graph -> runs/graph/data.pt
    python examples/graph/run.py train                   # HGT and BPR-MF with deepseek's Trainer (BPR loss)
    python examples/graph/run.py evaluate                # recall@10 / nDCG@10 vs most-popular, random; recall@k PNG
    python examples/graph/run.py compress                # int8 embeddings: bytes and recall vs fp32
    python examples/graph/run.py serve                   # ds serve the model repository runs/graph/repo
    python examples/graph/run.py query --user 7          # top-10 items for user 7 from the running server

Common options: ``--run-dir`` (runs/graph), ``--tiny`` (prepare: a 200-user graph, seconds), ``--threads`` (1).
See examples/graph/README.md for the generating process and the results.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from deepseek.graph.data import GraphSpec, Interactions, build_hetero_graph, generate_interactions  # noqa: E402
from deepseek.graph.metrics import ndcg_at_k, recall_at_k, recall_curve, top_k_items  # noqa: E402
from deepseek.graph.models import HGTRecommender, MatrixFactorization  # noqa: E402
from deepseek.graph.serving import (MODEL_NAME, TopKRecommender, save_recommender,  # noqa: E402
                                    write_model_repository)
from deepseek.graph.split import TimeSplit, time_split, train_popularity  # noqa: E402
from deepseek.graph.train import BPRBatches, BPRLoss  # noqa: E402

TINY = GraphSpec(n_users=200, n_items=100, n_categories=10, n_communities=5, mean_interactions=10.0)
K, MAX_K = 10, 20
LIGHT = 3  # "light users": at most this many training interactions
AFFINITY = GraphSpec().affinity
# Trainer settings per model: (steps, batch, lr, l2), tuned on the full graph (BPR-MF overfits past ~100 steps
# without the strong l2; HGT needs fewer steps because every step refreshes every embedding through the graph)
TRAINING = {"hgt": {"max_steps": 150, "batch_size": 2048, "lr": 1e-2, "l2": 3e-2},
            "mf": {"max_steps": 200, "batch_size": 2048, "lr": 1e-2, "l2": 3e-2}}
TINY_STEPS = {"hgt": 60, "mf": 100}


# -- data ------------------------------------------------------------------------------------------

def prepare(run_dir: Path, tiny: bool = False, seed: int = 0) -> dict[str, Any]:
    """Generate the interactions, split them per user by time and save both to run_dir/data.pt."""
    spec = TINY if tiny else GraphSpec()
    spec = GraphSpec(**{**asdict(spec), "seed": seed})
    data = generate_interactions(spec)
    split = time_split(data, n_test=2)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"spec": asdict(spec), "data": asdict(data), "split": asdict(split)}, run_dir / "data.pt")
    summary = {"users": data.n_users, "items": data.n_items, "categories": data.n_categories,
               "interactions": len(data), "train": len(split.train_user), "held_out": len(split.test_user),
               "mean_user_degree": len(data) / data.n_users, "mean_item_degree": len(data) / data.n_items}
    print(json.dumps(summary))
    return summary


def load_data(run_dir: Path) -> tuple[Interactions, TimeSplit]:
    file = run_dir / "data.pt"
    if not file.is_file():
        raise SystemExit(f"{file} is missing: run `python examples/graph/run.py prepare --run-dir {run_dir}` first")
    saved = torch.load(file, weights_only=True)  # plain tensors and numbers only
    return Interactions(**saved["data"]), TimeSplit(**saved["split"])


# -- training --------------------------------------------------------------------------------------

def make_model(name: str, data: Interactions, split: TimeSplit) -> torch.nn.Module:
    if name == "mf":
        return MatrixFactorization(data.n_users, data.n_items, dim=64)
    graph = build_hetero_graph(data.n_users, data.n_items, data.n_categories, data.item_category,
                               split.train_user, split.train_item)
    return HGTRecommender(graph, dim=64, layers=2, heads=2)


def evaluate_scores(scores: torch.Tensor, split: TimeSplit) -> dict[str, Any]:
    """recall@10, nDCG@10, recall@1..20 and the top-20 lists of ``scores`` [n_users, n_items]."""
    top = top_k_items(scores, MAX_K, exclude=split.train_items)
    relevant = split.test_items
    return {"recall@10": recall_at_k(top, relevant, K), "ndcg@10": ndcg_at_k(top, relevant, K),
            "recall_curve": recall_curve(top, relevant, MAX_K), "top": top}


def evaluate_embeddings(user_emb: torch.Tensor, item_emb: torch.Tensor, split: TimeSplit) -> dict[str, Any]:
    return evaluate_scores(user_emb @ item_emb.T, split)


def planted_truth_scores(data: Interactions, split: TimeSplit) -> torch.Tensor:
    """The generator's choice probability with the true communities and the training popularity counts:
    affinity x popularity within the community's categories + (1 - affinity) x popularity overall."""
    popularity = train_popularity(split)
    n_communities = int(data.user_community.max()) + 1
    preferred = ((data.item_category % n_communities)[None, :] == torch.arange(n_communities)[:, None]).float()
    inside = popularity[None, :] * preferred / (popularity[None, :] * preferred).sum(1, keepdim=True)
    chance = AFFINITY * inside + (1 - AFFINITY) * popularity[None, :] / popularity.sum()
    return chance[data.user_community]


def light_users(split: TimeSplit) -> list[list[int]]:
    """Held-out items of users with at most LIGHT training interactions only (the others: empty, not scored)."""
    return [held if 0 < len(seen) <= LIGHT else [] for held, seen in zip(split.test_items, split.train_items)]


def train(run_dir: Path, models: list[str], steps: Optional[int] = None, seed: int = 0,
          device: str = "cpu") -> dict[str, Any]:
    """Train each model with the Trainer; save its final user/item embeddings to run_dir/<model>/embeddings.pt."""
    from deepseek.train.config import load_train_config
    from deepseek.train.trainer import Trainer

    data, split = load_data(run_dir)
    tiny = data.n_users <= TINY.n_users
    results = {}
    for name in models:
        settings = TRAINING[name]
        max_steps = steps or (TINY_STEPS[name] if tiny else settings["max_steps"])
        config = load_train_config(None, [
            f"run_dir={run_dir / name}", f"max_steps={max_steps}", f"batch_size={settings['batch_size']}",
            "precision=fp32", f"device={device}", f"seed={seed}", f"optimizer.lr={settings['lr']}",
            "optimizer.weight_decay=0.0", "schedule.warmup_steps=10", "log_every=10", "eval_every=0",
            f"checkpoint.every={max_steps}", "tensorboard=false", f"progress={'false' if tiny else 'true'}"])
        torch.manual_seed(seed)
        model = make_model(name, data, split)
        batches = BPRBatches(split.train_user, split.train_item, data.n_items,
                             min(settings["batch_size"], len(split.train_user)), seed=seed)

        def eval_fn(m: torch.nn.Module) -> dict[str, float]:
            found = evaluate_embeddings(*m(), split)
            return {"recall@10": found["recall@10"], "ndcg@10": found["ndcg@10"]}

        trainer = Trainer(model, config, batches=batches, loss_fn=BPRLoss(l2=settings["l2"]), eval_fn=eval_fn,
                          throughput_unit="triples/s")
        result = trainer.fit()
        with torch.no_grad():
            user_emb, item_emb = trainer.model.eval()()
        (run_dir / name).mkdir(parents=True, exist_ok=True)
        torch.save({"user_emb": user_emb.cpu(), "item_emb": item_emb.cpu()}, run_dir / name / "embeddings.pt")
        results[name] = {"steps": result.step, "seconds": round(result.elapsed_s, 1), "loss": result.loss,
                         "params": sum(p.numel() for p in model.parameters())}
        print(f"{name}: {results[name]}")
    return results


def load_embeddings(run_dir: Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    file = run_dir / name / "embeddings.pt"
    if not file.is_file():
        raise SystemExit(f"{file} is missing: run `python examples/graph/run.py train --run-dir {run_dir}` first")
    saved = torch.load(file, weights_only=True)
    return saved["user_emb"], saved["item_emb"]


# -- evaluation ------------------------------------------------------------------------------------

def evaluate(run_dir: Path, models: list[str], plot: Optional[Path] = None) -> dict[str, Any]:
    """Ours and the baselines on the same split: recall@10, nDCG@10, recall@k for k = 1..20."""
    data, split = load_data(run_dir)
    popularity = train_popularity(split)
    generator = torch.Generator().manual_seed(0)
    rows = {
        "most-popular": evaluate_embeddings(torch.ones(data.n_users, 1), popularity[:, None], split),
        "random": evaluate_scores(torch.rand(data.n_users, data.n_items, generator=generator), split),  # per user
    }
    labels = {"hgt": "HGT (ours)", "mf": "BPR-MF"}
    for name in models:
        rows[labels[name]] = evaluate_embeddings(*load_embeddings(run_dir, name), split)
    # not a model: the generator's own rule (true community, training popularity) bounds what can be learned
    rows["planted-truth ceiling"] = evaluate_scores(planted_truth_scores(data, split), split)
    light = light_users(split)
    for name, row in rows.items():
        row["recall@10_light_users"] = recall_at_k(row.pop("top"), light, K)
        print(f"{name:>22}: recall@10 {row['recall@10']:.4f}  nDCG@10 {row['ndcg@10']:.4f}  "
              f"recall@10 of users with <= {LIGHT} training interactions {row['recall@10_light_users']:.4f}")
    (run_dir / "results.json").write_text(json.dumps(rows, indent=1))
    if plot is not None:
        plot_recall_curves(rows, plot)
        print(f"recall@k curve: {plot}")
    return rows


def plot_recall_curves(rows: dict[str, dict], out: Path) -> Path:
    from matplotlib.figure import Figure  # the object API: no pyplot, no GUI backend

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ks = list(range(1, MAX_K + 1))
    for name, row in rows.items():
        style = {"linestyle": "--", "color": "grey"} if "ceiling" in name else {"marker": "o", "markersize": 3}
        ax.plot(ks, row["recall_curve"], label=name, **style)
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_xticks([1, 5, 10, 15, 20])
    ax.set_title("Held-out interactions in the top k (full catalogue)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


# -- compression and serving -----------------------------------------------------------------------

def write_repository(run_dir: Path, name: str = "hgt", quantize: bool = False, k: int = K) -> Path:
    """run_dir/repo/recommender/{config.yaml, 1/model.safetensors}: the served top-k module."""
    _, split = load_data(run_dir)
    user_emb, item_emb = load_embeddings(run_dir, name)
    return write_model_repository(run_dir / "repo", user_emb, item_emb, split.train_items, k=k, quantize=quantize)


def compress(run_dir: Path, name: str = "hgt") -> dict[str, Any]:
    """Int8 embeddings (per-row scales): file bytes and recall@10 / nDCG@10 against fp32, through the served module."""
    from safetensors.torch import load_file

    _, split = load_data(run_dir)
    user_emb, item_emb = load_embeddings(run_dir, name)
    out = {}
    for label, quantize in (("fp32", False), ("int8", True)):
        file = save_recommender(run_dir / "compress" / label, user_emb, item_emb, split.train_items, k=MAX_K,
                                quantize=quantize)
        module = TopKRecommender()
        module.load_state_dict(load_file(str(file)))
        with torch.no_grad():
            top, _ = module(torch.arange(split.n_users)[:, None])
        relevant = split.test_items
        out[label] = {"bytes": file.stat().st_size, "recall@10": recall_at_k(top, relevant, K),
                      "ndcg@10": ndcg_at_k(top, relevant, K)}
        print(f"{label}: {out[label]}")
    (run_dir / "compress.json").write_text(json.dumps(out, indent=1))
    return out


def serve(run_dir: Path, port: int, quantize: bool) -> None:
    repo = write_repository(run_dir, quantize=quantize)
    command = [sys.executable, "-m", "deepseek.cli.main", "serve", "--model-repository", str(repo),
               "--http-port", str(port), "--no-grpc"]
    print(" ".join(command))
    subprocess.run(command, check=False)


def query(url: str, users: list[int]) -> dict[str, Any]:
    import httpx

    body = {"inputs": [{"name": "user_id", "shape": [len(users), 1], "datatype": "INT64", "data": users}]}
    response = httpx.post(f"{url}/v2/models/{MODEL_NAME}/infer", json=body, timeout=30)
    answer = response.json()
    if response.status_code != 200:
        print(f"HTTP {response.status_code}: {answer.get('error')}")
        return answer
    outputs = {o["name"]: o for o in answer["outputs"]}
    k = outputs["item_ids"]["shape"][1]
    for row, user in enumerate(users):
        items = outputs["item_ids"]["data"][row * k:(row + 1) * k]
        scores = outputs["scores"]["data"][row * k:(row + 1) * k]
        print(f"user {user}: " + ", ".join(f"{i} ({s:.2f})" for i, s in zip(items, scores)))
    return answer


def main(argv: Optional[list[str]] = None) -> Any:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "train", "evaluate", "compress", "serve", "query"])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/graph"))
    parser.add_argument("--tiny", action="store_true", help="prepare: a 200-user graph (seconds end to end)")
    parser.add_argument("--models", default="hgt,mf", help="train/evaluate: hgt, mf or both")
    parser.add_argument("--steps", type=int, default=None, help="train: override the steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="train: cpu, or auto (CUDA when available; the numbers in "
                                                        "the README are CPU)")
    parser.add_argument("--plot", type=Path, default=None, help="evaluate: the recall@k PNG "
                                                                "(default run_dir/recall_at_k.png)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--int8", action="store_true", help="serve: the int8 embeddings")
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--user", type=int, action="append", help="query: user id (repeatable)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(TRAINING))
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)} (hgt, mf)")
    if args.step == "prepare":
        return prepare(args.run_dir, args.tiny, args.seed)
    if args.step == "train":
        return train(args.run_dir, models, args.steps, args.seed, args.device)
    if args.step == "evaluate":
        return evaluate(args.run_dir, models, args.plot or args.run_dir / "recall_at_k.png")
    if args.step == "compress":
        return compress(args.run_dir)
    if args.step == "serve":
        return serve(args.run_dir, args.port, args.int8)
    return query(args.url, args.user or [0])


if __name__ == "__main__":
    main()
