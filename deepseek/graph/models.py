"""Recommenders that map every user and item to an embedding; a (user, item) score is their dot product.

- :class:`HGTRecommender`: learned node embeddings refined by Heterogeneous Graph Transformer layers
  (``torch_geometric.nn.HGTConv``: attention per meta-relation — user→item, item→user, item→category,
  category→item — so an item's embedding mixes in its category and its users, and a user's its items and, two
  layers down, the users and categories behind them). Full-batch: every forward recomputes all embeddings over
  the whole (training) graph, which fits a graph of thousands of nodes and needs no neighbour sampler.
- :class:`MatrixFactorization`: the BPR-MF baseline — one free embedding per user and item, no graph.

Both have ``forward() -> (user_embeddings [n_users, d], item_embeddings [n_items, d])``, so the BPR loss
(:mod:`deepseek.graph.train`) and the metrics treat them alike.
"""

from __future__ import annotations

import torch
from torch import nn

EMBEDDING_STD = 0.1  # N(0, 1) initial embeddings give initial dot products of ~d and saturate the BPR sigmoid


def _embedding(n: int, dim: int) -> nn.Embedding:
    table = nn.Embedding(n, dim)
    nn.init.normal_(table.weight, std=EMBEDDING_STD)
    return table


def _buffer_name(edge_type: tuple[str, str, str]) -> str:
    return "edges__" + "__".join(edge_type)


class HGTRecommender(nn.Module):
    """Node embeddings + ``layers`` HGTConv layers (``heads`` attention heads, residual), over ``graph``
    (a HeteroData from :func:`deepseek.graph.data.build_hetero_graph`, training edges only). The edges ride
    along as non-persistent buffers (they move with ``.to(device)`` but stay out of the state dict)."""

    def __init__(self, graph, dim: int = 64, layers: int = 2, heads: int = 2):
        from torch_geometric.nn import HGTConv

        super().__init__()
        node_types, edge_types = graph.metadata()
        self.edge_types = [tuple(t) for t in edge_types]
        self.embeddings = nn.ModuleDict({t: _embedding(graph[t].num_nodes, dim) for t in node_types})
        self.convs = nn.ModuleList(HGTConv(dim, dim, graph.metadata(), heads=heads) for _ in range(layers))
        for edge_type in self.edge_types:
            self.register_buffer(_buffer_name(edge_type), graph[edge_type].edge_index.long(), persistent=False)

    def edge_index_dict(self) -> dict[tuple[str, str, str], torch.Tensor]:
        return {t: getattr(self, _buffer_name(t)) for t in self.edge_types}

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = {t: table.weight for t, table in self.embeddings.items()}
        edges = self.edge_index_dict()
        for conv in self.convs:
            out = conv(x, edges)
            # residual: the node's own embedding stays (what MF would learn); the graph adds its neighbourhood
            x = {t: x[t] + out[t] if out.get(t) is not None else x[t] for t in x}
        return x["user"], x["item"]


class MatrixFactorization(nn.Module):
    """BPR-MF (Rendle et al. 2009): a free ``dim``-vector per user and per item."""

    def __init__(self, n_users: int, n_items: int, dim: int = 64):
        super().__init__()
        self.users = _embedding(n_users, dim)
        self.items = _embedding(n_items, dim)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.users.weight, self.items.weight
