"""A seeded generator of user-item interactions with planted structure, and the heterogeneous graph built on them.

    spec = GraphSpec(n_users=2000, n_items=1000, seed=0)
    data = generate_interactions(spec)            # Interactions: user, item, time (+ the planted truth)
    graph = build_hetero_graph(data.n_users, data.n_items, data.n_categories, data.item_category,
                               train_user, train_item)     # HeteroData: user -interacts-> item -in-> category

The generating process (also written out in examples/graph/README.md; the data is synthetic):

1. Every item gets a category (``item % n_categories``: equal-sized categories) and a popularity weight drawn
   from a log-normal (σ = ``popularity_sigma``), so a few items are much more popular than most, as in real
   catalogues.
2. Categories are dealt round-robin to ``n_communities`` communities: community k prefers categories k, k + K,
   k + 2K, ... Every user belongs to one community, drawn uniformly.
3. A user makes ``1 + Poisson(λ_u)`` distinct interactions (capped at a quarter of the catalogue), with
   ``λ_u = (mean_interactions - 1) · L_u / E[L]`` and ``L_u`` log-normal (σ = ``activity_sigma``): a long tail
   of light users and a few heavy ones, as real activity is (σ = 0: every user Poisson alike). Each
   interaction is, with probability ``affinity``, an item of one of the community's preferred
   categories, else any item; within that set the item is drawn by popularity, never twice for one user.
4. Timestamps are sorted uniform draws in [0, ``days``): a user's interactions are ordered in time, and its
   later interactions follow the same community preference as its earlier ones, so the past predicts the future.

Only the interactions, item categories and timestamps are given to models; ``user_community`` is the planted
truth, kept for tests and analysis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepseek.config import ConfigError


@dataclass(frozen=True)
class GraphSpec:
    """The generator's knobs (defaults: the example's full size, ~40k interactions)."""

    n_users: int = 2000
    n_items: int = 1000
    n_categories: int = 20
    n_communities: int = 5
    mean_interactions: float = 20.0
    affinity: float = 0.8  # share of a user's interactions inside its community's categories
    popularity_sigma: float = 1.0
    activity_sigma: float = 1.0  # spread of users' activity (log-normal); 0: Poisson with one rate for all
    days: float = 365.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_users", "n_items", "n_categories", "n_communities"):
            if getattr(self, name) < 1:
                raise ConfigError(f"GraphSpec.{name} must be positive, got {getattr(self, name)}")
        if self.n_communities > self.n_categories:
            raise ConfigError(f"GraphSpec: {self.n_communities} communities need at least as many categories, "
                              f"got {self.n_categories}")
        if not 0.0 <= self.affinity <= 1.0:
            raise ConfigError(f"GraphSpec.affinity must lie in [0, 1], got {self.affinity}")
        if self.mean_interactions < 1:
            raise ConfigError(f"GraphSpec.mean_interactions must be >= 1, got {self.mean_interactions}")


@dataclass
class Interactions:
    """Interaction rows (``user``, ``item``, ``time``: equal-length tensors) and the catalogue's item categories."""

    user: torch.Tensor  # int64 [E]
    item: torch.Tensor  # int64 [E]
    time: torch.Tensor  # float32 [E], days
    item_category: torch.Tensor  # int64 [n_items]
    user_community: torch.Tensor  # int64 [n_users]: the planted truth (not a model input)
    n_users: int
    n_items: int
    n_categories: int

    def __len__(self) -> int:
        return len(self.user)


def generate_interactions(spec: GraphSpec) -> Interactions:
    """Interactions drawn by the process in the module docs; the same ``spec`` gives the same tensors."""
    g = torch.Generator().manual_seed(spec.seed)
    item_category = torch.arange(spec.n_items) % spec.n_categories
    popularity = torch.exp(spec.popularity_sigma * torch.randn(spec.n_items, generator=g))
    user_community = torch.randint(spec.n_communities, (spec.n_users,), generator=g)
    preferred = (item_category % spec.n_communities)[None, :] == torch.arange(spec.n_communities)[:, None]  # [K, I]
    activity = torch.exp(spec.activity_sigma * torch.randn(spec.n_users, generator=g) - spec.activity_sigma ** 2 / 2)
    counts = 1 + torch.poisson((spec.mean_interactions - 1.0) * activity, generator=g).long()
    counts = counts.clamp(max=max(1, spec.n_items // 4))
    users, items, times = [], [], []
    for u in range(spec.n_users):
        n = int(counts[u])
        inside = torch.rand(n, generator=g) < spec.affinity
        weights = popularity.clone()
        chosen = []
        for from_community in inside.tolist():
            w = weights * preferred[user_community[u]] if from_community else weights
            if float(w.sum()) <= 0:  # the community's items are used up: fall back to the catalogue
                w = weights
            i = int(torch.multinomial(w, 1, generator=g))
            chosen.append(i)
            weights[i] = 0.0  # distinct items per user
        users.append(torch.full((n,), u, dtype=torch.long))
        items.append(torch.tensor(chosen, dtype=torch.long))
        times.append(torch.sort(torch.rand(n, generator=g) * spec.days).values)
    return Interactions(torch.cat(users), torch.cat(items), torch.cat(times).float(), item_category, user_community,
                        spec.n_users, spec.n_items, spec.n_categories)


def build_hetero_graph(n_users: int, n_items: int, n_categories: int, item_category: torch.Tensor,
                       user: torch.Tensor, item: torch.Tensor):
    """The message-passing graph: ``user -interacts-> item -in-> category`` and their reverses
    (``rev_interacts``, ``rev_in``). Pass the *training* interactions only, so nothing held out flows into the
    embeddings. Nodes carry no features (``num_nodes`` only): models learn an embedding per node."""
    import torch_geometric.transforms as T
    from torch_geometric.data import HeteroData

    data = HeteroData()
    data["user"].num_nodes = n_users
    data["item"].num_nodes = n_items
    data["category"].num_nodes = n_categories
    data["user", "interacts", "item"].edge_index = torch.stack([user.long(), item.long()])
    data["item", "in", "category"].edge_index = torch.stack([torch.arange(n_items), item_category.long()])
    return T.ToUndirected()(data)
