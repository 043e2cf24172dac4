"""Training pieces for BPR (Bayesian personalised ranking) with sampled negatives, shaped for
:class:`deepseek.train.Trainer` (which the graph package does not import: the example wires them together).

    batches = BPRBatches(split.train_user, split.train_item, n_items, batch_size=1024, seed=0)
    loss_fn = BPRLoss(l2=1e-4)
    Trainer(model, config, batches=batches, loss_fn=loss_fn, ...)   # model() -> (user_emb, item_emb)

Each batch is ``(users, positives, negatives)``: training interactions in a seeded per-epoch order, each with
one item drawn uniformly from those the user has *not* interacted with in training (resampled on a
collision; negatives may still be items the user would like — held-out ones included — as in every sampled
BPR, which is what the loss expects).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.nn import functional as F

NEGATIVE_RETRIES = 20  # redraws for negatives that hit a training item; a user owning the catalogue keeps the last


def bpr_loss(positive_scores: torch.Tensor, negative_scores: torch.Tensor) -> torch.Tensor:
    """−mean log σ(ŷ_ui − ŷ_uj): positives should outscore negatives."""
    return -F.logsigmoid(positive_scores - negative_scores).mean()


class NegativeSampler:
    """Uniform negatives per user, excluding the user's training items (checked by ``torch.isin`` on
    ``user * n_items + item`` keys)."""

    def __init__(self, train_user: torch.Tensor, train_item: torch.Tensor, n_items: int):
        self.n_items = n_items
        self.seen = torch.unique(train_user.long() * n_items + train_item.long())

    def sample(self, users: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        negatives = torch.randint(self.n_items, (len(users),), generator=generator)
        for _ in range(NEGATIVE_RETRIES):
            clash = torch.isin(users * self.n_items + negatives, self.seen)
            if not bool(clash.any()):
                break
            negatives[clash] = torch.randint(self.n_items, (int(clash.sum()),), generator=generator)
        return negatives


class BPRBatches:
    """Endless ``(users, positives, negatives)`` batches over the training interactions; resumable through
    ``state_dict()`` (epoch ``e``'s order comes from a generator seeded with ``(seed, e)``, each batch's negatives from one
    seeded with ``(seed, e, position)``)."""

    def __init__(self, train_user: torch.Tensor, train_item: torch.Tensor, n_items: int, batch_size: int,
                 seed: int = 0):
        if batch_size > len(train_user):
            batch_size = len(train_user)  # a tiny graph: one batch is every interaction
        self.user, self.item = train_user.long(), train_item.long()
        self.sampler = NegativeSampler(self.user, self.item, n_items)
        self.batch_size, self.seed = batch_size, seed
        self.epoch, self.position = 0, 0
        self._order: Optional[torch.Tensor] = None

    def _generator(self, *key: int) -> torch.Generator:
        seed = self.seed
        for part in key:
            seed = seed * 1_000_003 + part
        return torch.Generator().manual_seed(seed % 2**63)

    def __iter__(self) -> "BPRBatches":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.position + self.batch_size > len(self.user):
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = torch.randperm(len(self.user), generator=self._generator(self.epoch))
        rows = self._order[self.position:self.position + self.batch_size]
        # negatives from a generator keyed by (epoch, position): a resumed run draws the same ones
        negatives = self.sampler.sample(self.user[rows], self._generator(self.epoch, self.position + 1))
        self.position += self.batch_size
        return self.user[rows], self.item[rows], negatives

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.seed = int(state.get("seed", self.seed))
        self._order = None


class BPRLoss:
    """``loss_fn(model, batch)`` for the Trainer: BPR on the batch's triples plus ``l2`` × the squared norm of
    the embeddings it touched, per triple (LightGCN's regulariser). ``last`` holds the parts for the metrics log."""

    def __init__(self, l2: float = 1e-4):
        self.l2 = l2
        self.last: dict[str, float] = {}

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        user_emb, item_emb = model()
        # the batches are built on the CPU; the embeddings live where the model does (CUDA under device=auto)
        users, positives, negatives = (t.to(user_emb.device) for t in batch)
        u, p, n = user_emb[users], item_emb[positives], item_emb[negatives]
        ranking = bpr_loss((u * p).sum(-1), (u * n).sum(-1))
        reg = (u.pow(2).sum() + p.pow(2).sum() + n.pow(2).sum()) / len(users)
        self.last = {"bpr": float(ranking.detach())}
        return ranking + self.l2 * reg
