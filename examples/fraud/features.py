"""Per-transaction features for the sequence models, and hand-made window features for the gradient-boosting baseline.

Every feature of a transaction uses that transaction and strictly earlier ones of the same account (never a label,
never a later event), so a window built from them leaks nothing across the time split. Numeric features are
standardized with statistics of the training period only (``TimeSeriesSampler.fit_standardizer``).

Per transaction (``NUMERIC``, then one-hot category, then ``present`` = 1; padding rows are all zeros):
log amount, log amount minus the account's mean log amount so far, log hours since the account's previous
transaction, log km from home, log km from the previous transaction, log speed (km/h) from it, hour sin/cos.
"""

from __future__ import annotations

import numpy as np
import torch

from deepseek.data import Standardizer, TimeSeriesSampler

from fraud.generate import CATEGORIES, Transactions

NUMERIC = ("log_amount", "amount_vs_history", "log_gap_h", "log_km_home", "log_km_prev", "log_speed",
           "hour_sin", "hour_cos")
N_FEATURES = len(NUMERIC) + len(CATEGORIES) + 1
KM_PER_DEGREE = 111.0
FIRST_GAP_H = 24.0 * 30  # the "previous transaction" of an account's first one: a month ago


def raw_features(tx: Transactions) -> np.ndarray:
    """[N, len(NUMERIC)] float64, in the order of ``tx`` (sorted by time)."""
    n = len(tx)
    order = np.lexsort((np.arange(n), tx.time, tx.account))
    acc = tx.account[order]
    first = np.r_[True, acc[1:] != acc[:-1]]
    prev = np.where(first, -1, np.arange(n) - 1)  # position of the previous transaction of the same account

    log_amount = np.log1p(tx.amount[order])
    gap_h = np.where(first, FIRST_GAP_H, (tx.time[order] - tx.time[order][prev]) * 24)
    lat, lon = tx.lat[order], tx.lon[order]
    km_home = np.hypot(lat - tx.home_lat[order], lon - tx.home_lon[order]) * KM_PER_DEGREE
    km_prev = np.where(first, 0.0, np.hypot(lat - lat[prev], lon - lon[prev]) * KM_PER_DEGREE)
    speed = km_prev / np.maximum(gap_h, 0.05)
    # the account's mean log amount over strictly earlier transactions (0 difference for the first one)
    group_id = np.cumsum(first) - 1
    csum = np.cumsum(log_amount)
    group_base = np.r_[0.0, csum][np.nonzero(first)[0]][group_id]
    count_before = np.arange(n) - np.nonzero(first)[0][group_id]
    mean_before = np.where(count_before > 0, (csum - log_amount - group_base) / np.maximum(count_before, 1), log_amount)
    hour = (tx.time[order] % 1.0) * 2 * np.pi

    sorted_features = np.stack([log_amount, log_amount - mean_before, np.log1p(gap_h), np.log1p(km_home),
                                np.log1p(km_prev), np.log1p(speed), np.sin(hour), np.cos(hour)], axis=1)
    features = np.empty_like(sorted_features)
    features[order] = sorted_features
    return features


def model_inputs(tx: Transactions, raw: np.ndarray, scaler: Standardizer) -> torch.Tensor:
    """[N, N_FEATURES] float32: standardized numeric features, one-hot category, present flag."""
    numeric = scaler(torch.from_numpy(raw).float())
    onehot = torch.nn.functional.one_hot(torch.from_numpy(tx.category), len(CATEGORIES)).float()
    return torch.cat([numeric, onehot, torch.ones(len(tx), 1)], dim=1)


def window_features(tx: Transactions, raw: np.ndarray, idx_BW: torch.Tensor) -> np.ndarray:
    """[B, F] hand-made features per window for the baseline (a practitioner's first try, handbook-style):
    the last transaction's raw features and category; over the window: count, mean and max log amount, last
    minus mean log amount, count of tiny amounts (< $3), max km from home, max speed, min gap, distinct
    categories, transactions in the last hour and the last day, and the hours the window spans."""
    idx = idx_BW.numpy()
    present = idx >= 0
    safe = np.maximum(idx, 0)
    count = present.sum(1)
    last = idx[:, -1]

    def masked(values, fill):
        return np.where(present, values[safe], fill)

    log_amount = masked(raw[:, 0], np.nan)
    time = masked(tx.time, np.nan)
    age_h = (tx.time[last][:, None] - time) * 24
    categories = masked(tx.category, -1)
    distinct = np.array([len(set(row[row >= 0].tolist())) for row in categories])
    return np.column_stack([
        raw[last], tx.category[last], count,
        np.nanmean(log_amount, 1), np.nanmax(log_amount, 1), raw[last, 0] - np.nanmean(log_amount, 1),
        np.nansum(masked(tx.amount, np.inf) < 3, 1), np.nanmax(masked(raw[:, 3], np.nan), 1),
        np.nanmax(masked(raw[:, 5], np.nan), 1), np.nanmin(masked(raw[:, 2], np.nan), 1), distinct,
        np.nansum(age_h <= 1, 1), np.nansum(age_h <= 24, 1), np.nanmax(age_h, 1),
    ])


WINDOW_FEATURE_NAMES = (*[f"last_{n}" for n in NUMERIC], "last_category", "count", "mean_log_amount",
                        "max_log_amount", "last_vs_window_mean", "tiny_amounts", "max_log_km_home", "max_log_speed",
                        "min_log_gap_h", "distinct_categories", "count_1h", "count_24h", "span_h")
CATEGORY_COLUMN = len(NUMERIC)  # last_category: categorical for HistGradientBoostingClassifier


def windows_tensor(inputs_NF: torch.Tensor, idx_BW: torch.Tensor) -> torch.Tensor:
    """[B, W, N_FEATURES]: the model's input for windows ``idx_BW`` (padding rows all zero)."""
    return TimeSeriesSampler.gather(inputs_NF, idx_BW)
