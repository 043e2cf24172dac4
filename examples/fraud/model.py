"""Sequence classifiers over a window of an account's transactions: LSTM + attention pooling, or a small transformer.

Input ``x_BWF``: B windows of W transactions (oldest first, left-padded with zero rows), F features per
transaction whose last one is the ``present`` flag (features.py). Output: logits [B, 2] (genuine, fraud) — two
classes so that distillation's softened softmax (deepseek.compress.distillation_loss) applies unchanged.

Both models read the window the same way: project each transaction to H, encode the sequence, then pool it with
additive attention over the present transactions (padding masked out) and concatenate the encoding of the last
transaction — the one being scored — before a small MLP head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AttentionPooling(nn.Module):
    """``sum_t a_t h_t`` with ``a = softmax_t(v . tanh(W h_t))`` over present positions: [B, W, H] -> [B, H]."""

    def __init__(self, hidden: int):
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)
        self.score = nn.Linear(hidden, 1, bias=False)

    def forward(self, h_BWH: torch.Tensor, present_BW: torch.Tensor) -> torch.Tensor:
        scores_BW = self.score(torch.tanh(self.proj(h_BWH))).squeeze(-1)
        scores_BW = scores_BW.masked_fill(~present_BW, -1e9)  # the last position is always present
        return (torch.softmax(scores_BW, dim=-1).unsqueeze(-1) * h_BWH).sum(1)


class FraudLSTM(nn.Module):
    """Linear(F, H) -> ReLU -> LSTM(H, H, layers) -> [attention pool, last step] -> MLP -> 2 logits."""

    def __init__(self, n_features: int, hidden: int = 64, layers: int = 2, dropout: float = 0.0):
        super().__init__()
        self.hparams = {"kind": "lstm", "n_features": n_features, "hidden": hidden, "layers": layers}
        self.embed = nn.Linear(n_features, hidden)
        self.encoder = nn.LSTM(hidden, hidden, num_layers=layers, batch_first=True,
                               dropout=dropout if layers > 1 else 0.0)
        self.pool = AttentionPooling(hidden)
        self.head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, x_BWF: torch.Tensor) -> torch.Tensor:
        present_BW = x_BWF[..., -1] > 0.5
        h_BWH, _ = self.encoder(F.relu(self.embed(x_BWF)))
        return self.head(torch.cat([self.pool(h_BWH, present_BW), h_BWH[:, -1]], dim=-1))


class FraudTransformer(nn.Module):
    """Linear(F, H) + learned positions -> TransformerEncoder(layers, 4 heads, padding masked) -> pool -> MLP."""

    def __init__(self, n_features: int, hidden: int = 64, layers: int = 2, window: int = 16, dropout: float = 0.0):
        super().__init__()
        self.hparams = {"kind": "transformer", "n_features": n_features, "hidden": hidden, "layers": layers,
                        "window": window}
        self.embed = nn.Linear(n_features, hidden)
        self.position_WH = nn.Parameter(torch.zeros(window, hidden))
        layer = nn.TransformerEncoderLayer(hidden, nhead=4, dim_feedforward=2 * hidden, dropout=dropout,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.pool = AttentionPooling(hidden)
        self.head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, x_BWF: torch.Tensor) -> torch.Tensor:
        present_BW = x_BWF[..., -1] > 0.5
        h_BWH = self.embed(x_BWF) + self.position_WH[-x_BWF.shape[1]:]
        h_BWH = self.encoder(h_BWH, src_key_padding_mask=~present_BW)
        return self.head(torch.cat([self.pool(h_BWH, present_BW), h_BWH[:, -1]], dim=-1))


class FraudProbability(nn.Module):
    """What is served: the model's probability of fraud, [B, W, F] -> [B, 1]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, transactions: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(transactions), dim=-1)[:, 1:]


def build_model(hparams: dict) -> nn.Module:
    """The model ``hparams`` (a model's ``.hparams``, saved next to its weights) describe."""
    kind = hparams["kind"]
    args = {k: v for k, v in hparams.items() if k != "kind"}
    return FraudLSTM(**args) if kind == "lstm" else FraudTransformer(**args)
