"""Per-account event windows for sequence classifiers (fraud on card transactions), split by time without leakage.

    sampler = TimeSeriesSampler(account_N, time_N, label_N, window=16, val_start=t1, test_start=t2, gap=7 * 86400)
    idx_BW, y_B = sampler.windows("train")                     # event indices, -1 = padding (left)
    scaler = sampler.fit_standardizer(numeric_NF)              # mean/std of the training period only
    x_BWF = TimeSeriesSampler.gather(scaler(numeric_NF), idx_BW)
    for rows_B in sampler.balanced_batches("train", batch_size=256, seed=0): ...   # rows of windows("train")

Every event ``i`` (a transaction) gives one window: the ``window`` most recent events of its account ending at
``i`` itself, oldest first, left-padded with -1 when the account has fewer; its label is ``label[i]`` (the
window is scored at the time of its last event). The leakage rules of the fraud-detection handbook (ch. 5):

- the split is by time first: an event belongs to the split of its own time: train ``t < val_start - gap``,
  validation ``val_start <= t < test_start - gap``, test ``t >= test_start``; events inside a gap are labelled
  in no split (the label delay: their fraud labels would not be known yet when the next period starts);
- a window's history holds only events of the same account that are not later than its labelled event, so no
  window reaches into a later split (a validation window may look back into the training period, which is
  known at its time);
- encoders and scalers are fitted on the training period only (:meth:`fit_standardizer`, :meth:`train_period`).

Ties in time within an account keep their input order. Legend: N events, B windows, W window length, F features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from deepseek.config import ConfigError

SPLITS = ("train", "val", "test")
MULTINOMIAL_LIMIT = 2**24  # torch.multinomial refuses more categories (pytorch/pytorch#2576)


@dataclass
class Standardizer:
    """``(x - mean) / std`` per column, with statistics from the rows it was fitted on (std 0 -> 1)."""

    mean_F: torch.Tensor
    std_F: torch.Tensor

    def __call__(self, x_NF: torch.Tensor) -> torch.Tensor:
        return (x_NF - self.mean_F) / self.std_F


class BalancedBatches:
    """Endless batches of window rows drawn with replacement, each class equally likely (weight 1/count).

    Batch ``k`` comes from a generator seeded with ``(seed, k)``, so the state is ``{"batch": k}`` and a restored
    iterator yields exactly the batches the uninterrupted one would have (the Trainer checkpoints it)."""

    def __init__(self, labels_B: torch.Tensor, batch_size: int, seed: int = 0):
        if labels_B.numel() == 0:
            raise ConfigError("balanced_batches: the split has no windows")
        if labels_B.numel() >= MULTINOMIAL_LIMIT:
            raise ConfigError(f"balanced_batches: {labels_B.numel():,} windows is more than torch.multinomial's "
                              f"{MULTINOMIAL_LIMIT:,}; subsample the negatives first")
        if batch_size < 1:
            raise ConfigError(f"balanced_batches: batch_size must be >= 1, got {batch_size}")
        classes, inverse, counts = torch.unique(labels_B, return_inverse=True, return_counts=True)
        self.weights_B = (1.0 / counts.double())[inverse]
        self.classes = classes.tolist()
        self.batch_size, self.seed, self.batch = batch_size, seed, 0

    def __iter__(self) -> "BalancedBatches":
        return self

    def __next__(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.batch) % 2**63)
        self.batch += 1
        return torch.multinomial(self.weights_B, self.batch_size, replacement=True, generator=generator)

    def state_dict(self) -> dict[str, int]:
        return {"batch": self.batch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch, self.seed = int(state["batch"]), int(state.get("seed", self.seed))


class TimeSeriesSampler:
    """Windows of each account's most recent events, labelled by the last one, in time-ordered splits.

    ``account_N`` (integer ids), ``time_N`` (any monotone clock: seconds, days) and ``label_N`` (integer classes)
    describe N events in any order. ``window`` is W; ``val_start`` / ``test_start`` the times the validation and
    test periods begin; ``gap`` the label delay left unlabelled before each of them (module docs).
    """

    def __init__(self, account_N, time_N, label_N, *, window: int, val_start: float, test_start: float,
                 gap: float = 0.0):
        account = np.asarray(account_N)
        time = np.asarray(time_N, dtype=np.float64)
        label = np.asarray(label_N)
        if not (account.ndim == time.ndim == label.ndim == 1 and len(account) == len(time) == len(label)):
            raise ConfigError(f"TimeSeriesSampler: account, time and label must be 1-D of one length, got "
                              f"{account.shape}, {time.shape}, {label.shape}")
        if window < 1:
            raise ConfigError(f"TimeSeriesSampler: window must be >= 1, got {window}")
        if gap < 0 or not val_start < test_start - gap:
            raise ConfigError(f"TimeSeriesSampler: need gap >= 0 and val_start < test_start - gap, got "
                              f"val_start={val_start}, test_start={test_start}, gap={gap}")
        if not np.isfinite(time).all():
            raise ConfigError("TimeSeriesSampler: times must be finite")
        self.window, self.val_start, self.test_start, self.gap = int(window), float(val_start), float(test_start), float(gap)
        self.time_N = time
        self.label_N = torch.as_tensor(label, dtype=torch.int64)
        self.history_NW = torch.from_numpy(self._history(account, time, self.window))
        self.split_of_N = np.full(len(time), "", dtype=object)
        self.split_of_N[time < self.val_start - self.gap] = "train"
        self.split_of_N[(time >= self.val_start) & (time < self.test_start - self.gap)] = "val"
        self.split_of_N[time >= self.test_start] = "test"

    @staticmethod
    def _history(account: np.ndarray, time: np.ndarray, window: int) -> np.ndarray:
        """[N, W] event indices: the account's W most recent events up to and including each event, -1 padded."""
        n = len(account)
        order = np.lexsort((np.arange(n), time, account))  # by account, then time, then input order (ties)
        sorted_account = account[order]
        group_start = np.r_[True, sorted_account[1:] != sorted_account[:-1]]
        first_of_group = np.maximum.accumulate(np.where(group_start, np.arange(n), 0))
        position = np.arange(n) - first_of_group  # how many earlier events the account has
        history_sorted = np.full((n, window), -1, dtype=np.int64)
        for back in range(window):  # column W-1 is the event itself, column W-1-back the event `back` steps earlier
            ok = position >= back
            rows = np.nonzero(ok)[0]
            history_sorted[rows, window - 1 - back] = order[rows - back]
        history = np.empty_like(history_sorted)
        history[order] = history_sorted
        return history

    # -- splits -------------------------------------------------------------------------------------------

    def split_events(self, split: str) -> torch.Tensor:
        """Indices of the events labelled in ``split``, in time order."""
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        events = np.nonzero(self.split_of_N == split)[0]
        return torch.from_numpy(events[np.argsort(self.time_N[events], kind="stable")])

    def windows(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(idx_BW, labels_B)``: the event indices of each window of ``split`` (-1 = padding), and its label."""
        events = self.split_events(split)
        return self.history_NW[events], self.label_N[events]

    def train_period(self) -> torch.Tensor:
        """Boolean [N]: the events of the training period (``t < val_start - gap``), the only ones to fit on."""
        return torch.from_numpy(self.time_N < self.val_start - self.gap)

    def fit_standardizer(self, x_NF: torch.Tensor) -> Standardizer:
        """Mean and std per column over the training period's rows of ``x_NF`` (one row per event)."""
        if x_NF.shape[0] != len(self.time_N):
            raise ConfigError(f"fit_standardizer: {x_NF.shape[0]} rows for {len(self.time_N)} events")
        rows = x_NF[self.train_period()].double()
        if rows.shape[0] == 0:
            raise ConfigError("fit_standardizer: the training period has no events")
        std = rows.std(dim=0, unbiased=False)
        return Standardizer(rows.mean(dim=0).to(x_NF.dtype), torch.where(std > 0, std, 1.0).to(x_NF.dtype))

    def balanced_batches(self, split: str, batch_size: int, seed: int = 0,
                         labels_B: Optional[torch.Tensor] = None) -> BalancedBatches:
        """Endless class-balanced batches of row numbers into :meth:`windows` of ``split`` (resumable)."""
        return BalancedBatches(self.windows(split)[1] if labels_B is None else labels_B, batch_size, seed)

    # -- features -------------------------------------------------------------------------------------

    @staticmethod
    def gather(x_NF: torch.Tensor, idx_BW: torch.Tensor) -> torch.Tensor:
        """[B, W, F]: the rows of ``x_NF`` for each window, zeros at padding (idx -1)."""
        present_BW = idx_BW >= 0
        out = x_NF[idx_BW.clamp_min(0)]
        return out * present_BW.unsqueeze(-1).to(out.dtype)

    def __len__(self) -> int:
        return len(self.time_N)
