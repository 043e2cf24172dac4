"""Full-catalogue ranking metrics with binary relevance (the definitions of PyG's ``metrics/link_pred.py``):

    Recall@k = hits in the top k / |relevant|            (the denominator is not capped at k)
    nDCG@k   = Σ_{r ≤ k} rel_r / log2(r + 1)  /  Σ_{r ≤ min(|relevant|, k)} 1 / log2(r + 1)

Every item is a candidate except the user's own training items (scored −inf), and each metric is averaged over
the users with at least one held-out item.

    top = top_k_items(user_emb @ item_emb.T, exclude=split.train_items, k=20)
    recall_at_k(top, split.test_items, 10), ndcg_at_k(top, split.test_items, 10)
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


def top_k_items(scores: torch.Tensor, k: int, exclude: Optional[Sequence[Sequence[int]]] = None) -> torch.Tensor:
    """[n_users, k] item ids, best first, from ``scores`` [n_users, n_items]; ``exclude[u]``'s items never appear
    (ties are broken by the lower item id, so the ranking is deterministic)."""
    scores = scores.detach().float().clone()
    if exclude is not None:
        rows = [u for u, items in enumerate(exclude) for _ in items]
        cols = [i for items in exclude for i in items]
        if rows:
            scores[torch.tensor(rows), torch.tensor(cols)] = float("-inf")
    k = min(k, scores.shape[1])
    # a stable descending sort keeps lower ids first among equal scores (topk's tie order is unspecified)
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]


def _evaluated(relevant: Sequence[Sequence[int]]) -> list[int]:
    return [u for u, items in enumerate(relevant) if len(items) > 0]


def recall_at_k(top: torch.Tensor, relevant: Sequence[Sequence[int]], k: int) -> float:
    """Mean over users with held-out items of (held-out items in the top k) / (number held out)."""
    users = _evaluated(relevant)
    if not users:
        return float("nan")
    top_k = top[:, :k].tolist()
    return sum(len(set(top_k[u]) & set(relevant[u])) / len(set(relevant[u])) for u in users) / len(users)


def ndcg_at_k(top: torch.Tensor, relevant: Sequence[Sequence[int]], k: int) -> float:
    """Mean over users with held-out items of DCG@k / ideal DCG@k (binary relevance)."""
    users = _evaluated(relevant)
    if not users:
        return float("nan")
    top_k = top[:, :k].tolist()
    total = 0.0
    for u in users:
        wanted = set(relevant[u])
        dcg = sum(1.0 / math.log2(r + 2) for r, i in enumerate(top_k[u]) if i in wanted)
        ideal = sum(1.0 / math.log2(r + 2) for r in range(min(len(wanted), k)))
        total += dcg / ideal
    return total / len(users)


def recall_curve(top: torch.Tensor, relevant: Sequence[Sequence[int]], max_k: int = 20) -> list[float]:
    """[Recall@1, ..., Recall@max_k] from one ranking (``top`` must hold at least ``max_k`` columns)."""
    return [recall_at_k(top, relevant, k) for k in range(1, max_k + 1)]
