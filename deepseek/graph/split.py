"""The per-user time split: each user's last interactions are held out, and everything a model or a baseline
learns from (the graph, popularity counts) comes from the rest.

    split = time_split(data, n_test=2)
    split.train_user, split.train_item         # message passing, BPR positives, popularity
    split.test_items                           # [n_users] lists of held-out items (empty: the user is not scored)

Leave-last-out per user means training may contain interactions later than another user's held-out ones (the
split is per user, not one global cut; Meng et al., arXiv 2007.13237, discuss the consequences); what it never
contains is anything of a user after that user's own cut-off, and popularity is counted on training rows only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepseek.config import ConfigError
from deepseek.graph.data import Interactions


@dataclass
class TimeSplit:
    """Training rows (user, item, time) and per-user held-out items (the last ``n_test`` of each user)."""

    train_user: torch.Tensor
    train_item: torch.Tensor
    train_time: torch.Tensor
    test_user: torch.Tensor
    test_item: torch.Tensor
    test_time: torch.Tensor
    n_users: int
    n_items: int

    @property
    def test_items(self) -> list[list[int]]:
        """Held-out items per user (index = user id); empty for users with nothing held out."""
        out: list[list[int]] = [[] for _ in range(self.n_users)]
        for u, i in zip(self.test_user.tolist(), self.test_item.tolist()):
            out[u].append(i)
        return out

    @property
    def train_items(self) -> list[list[int]]:
        """Training items per user (index = user id): what ranking excludes."""
        out: list[list[int]] = [[] for _ in range(self.n_users)]
        for u, i in zip(self.train_user.tolist(), self.train_item.tolist()):
            out[u].append(i)
        return out


def time_split(data: Interactions, n_test: int = 2, min_train: int = 1) -> TimeSplit:
    """Hold out each user's last ``n_test`` interactions (by time; ties by row order), keeping at least
    ``min_train`` in training: a user with ``<= min_train`` interactions keeps them all and is not evaluated."""
    if n_test < 1 or min_train < 1:
        raise ConfigError(f"time_split: n_test and min_train must be positive, got {n_test} and {min_train}")
    # sort by (user, time): a stable sort on time, then a stable sort on user, keeps each user's rows in time order
    order = torch.sort(data.time, stable=True).indices
    order = order[torch.sort(data.user[order], stable=True).indices]
    user = data.user[order]
    counts = torch.bincount(user, minlength=data.n_users)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(user)) - starts[user]  # position of each row within its user's history
    held = torch.clamp(counts - min_train, min=0).clamp(max=n_test)  # rows held out per user
    is_test = rank >= (counts - held)[user]
    train, test = order[~is_test], order[is_test]
    return TimeSplit(data.user[train], data.item[train], data.time[train], data.user[test], data.item[test],
                     data.time[test], data.n_users, data.n_items)


def train_popularity(split: TimeSplit) -> torch.Tensor:
    """Interaction counts per item over the training rows only (the most-popular baseline's scores)."""
    return torch.bincount(split.train_item, minlength=split.n_items).float()
