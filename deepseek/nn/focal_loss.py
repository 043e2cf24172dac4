"""Focal loss (Lin et al. 2017, arXiv 1708.02002) for rare positives: cross-entropy that down-weights easy examples.

    FL(p_t) = -alpha_t * (1 - p_t)^gamma * log(p_t)

``p_t`` is the probability the model gives the true class. With ``gamma = 0`` and ``alpha = None`` it is exactly
cross-entropy (binary: ``binary_cross_entropy_with_logits``; multi-class: ``cross_entropy``).

    loss_fn = FocalLoss(alpha=0.25, gamma=2.0)          # binary: logits [N], float targets [N] in {0, 1}
    loss = loss_fn(logits_N, targets_N)
    loss_fn = FocalLoss(alpha=[0.25, 0.75], gamma=2.0)  # multi-class: logits [N, C], class ids [N]

Alpha: a float is the binary convention (``alpha`` for positives, ``1 - alpha`` for negatives; torchvision's
``sigmoid_focal_loss``); α = 0.25 weighs positives *less*, since γ already silences the easy negatives; tune it
on validation PR-AUC. For [N, C] logits ``alpha`` is a per-class weight sequence (length C), or a float for
C = 2 (then class 1 is the positive class).

Numerics: everything comes from ``log_softmax`` / ``logsigmoid`` of the logits, never from a probability that
is then logged. The modulating factor ``(1 - p_t)^gamma`` is ``exp(gamma * log(1 - p_t))`` with ``log(1 - p_t)``
computed directly from the logits (``logsigmoid(-z_t)``; for C classes the log-sum-exp of the other classes), so
it stays finite with finite gradients when ``p_t -> 1`` even for ``gamma`` in (0, 1), where ``(1 - p)^gamma``
written naively has an infinite slope (kornia#918).

Reduction: ``mean`` (default), ``sum``, ``none``, or ``positives``: the sum divided by the number of positive
targets (at least 1), RetinaNet's normalisation; a plain mean over data with 0.5 % positives is ~200x smaller,
which shifts the useful learning rate.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from deepseek.config import ConfigError

REDUCTIONS = ("mean", "sum", "none", "positives")


class FocalLoss(nn.Module):
    """``FocalLoss(alpha=None, gamma=2.0, reduction="mean")``: binary (logits [N], targets [N] in {0, 1}) or
    multi-class (logits [N, C], class ids [N] int64). Returns a scalar, or [N] with ``reduction="none"``."""

    def __init__(self, alpha: Union[None, float, Sequence[float], torch.Tensor] = None, gamma: float = 2.0,
                 reduction: str = "mean"):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ConfigError(f"FocalLoss reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
        if not gamma >= 0:
            raise ConfigError(f"FocalLoss gamma must be >= 0, got {gamma}")
        if isinstance(alpha, (int, float)) and not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"FocalLoss alpha as a number is the positives' weight in [0, 1], got {alpha}")
        self.gamma, self.reduction = float(gamma), reduction
        self.alpha_scalar: Optional[float] = float(alpha) if isinstance(alpha, (int, float)) else None
        class_alpha = None if alpha is None or self.alpha_scalar is not None else torch.as_tensor(alpha, dtype=torch.float32)
        if class_alpha is not None and (class_alpha.dim() != 1 or bool((class_alpha < 0).any())):
            raise ConfigError(f"FocalLoss alpha per class must be a 1-D sequence of weights >= 0, got {alpha}")
        self.register_buffer("alpha_C", class_alpha, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.dim() == 1 or (logits.dim() == 2 and logits.shape[1] == 1 and targets.dim() == 2):
            loss_N, positive_N = self._binary(logits.reshape(-1).float(), targets.reshape(-1).float())
        elif logits.dim() == 2:
            loss_N, positive_N = self._multiclass(logits.float(), targets)
        else:
            raise ValueError(f"FocalLoss takes logits [N] (binary) or [N, C], got {tuple(logits.shape)}")
        if self.reduction == "none":
            return loss_N
        if self.reduction == "sum":
            return loss_N.sum()
        if self.reduction == "positives":
            return loss_N.sum() / positive_N.sum().clamp_min(1)
        return loss_N.mean()

    def _binary(self, z_N: torch.Tensor, y_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if z_N.shape != y_N.shape:
            raise ValueError(f"FocalLoss: logits {tuple(z_N.shape)} and targets {tuple(y_N.shape)} differ")
        if self.alpha_C is not None:
            raise ValueError("FocalLoss: per-class alpha needs logits [N, C]; binary logits take a float alpha")
        # z_t is the logit of the true class: log p_t = logsigmoid(z_t), log(1 - p_t) = logsigmoid(-z_t)
        z_t = torch.where(y_N > 0.5, z_N, -z_N)
        ce_N = F.binary_cross_entropy_with_logits(z_N, y_N, reduction="none")
        loss_N = self._modulate(ce_N, F.logsigmoid(-z_t))
        if self.alpha_scalar is not None:
            loss_N = loss_N * torch.where(y_N > 0.5, self.alpha_scalar, 1.0 - self.alpha_scalar)
        return loss_N, y_N > 0.5

    def _multiclass(self, z_NC: torch.Tensor, y_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if y_N.dim() != 1 or y_N.shape[0] != z_NC.shape[0] or y_N.dtype in (torch.float16, torch.bfloat16,
                                                                          torch.float32, torch.float64):
            raise ValueError(f"FocalLoss: logits [N, C] need int64 class ids [N], got {tuple(y_N.shape)} {y_N.dtype}")
        logp_NC = F.log_softmax(z_NC, dim=-1)
        logp_t = logp_NC.gather(1, y_N[:, None]).squeeze(1)
        # log(1 - p_t) = logsumexp of the other classes' log-probabilities: exact when p_t -> 1
        others_NC = logp_NC.masked_fill(F.one_hot(y_N, z_NC.shape[1]).bool(), float("-inf"))
        loss_N = self._modulate(-logp_t, torch.logsumexp(others_NC, dim=-1))
        if self.alpha_scalar is not None:
            if z_NC.shape[1] != 2:
                raise ValueError(f"FocalLoss: a float alpha needs 2 classes, got {z_NC.shape[1]}; give one per class")
            loss_N = loss_N * torch.where(y_N == 1, self.alpha_scalar, 1.0 - self.alpha_scalar)
        elif self.alpha_C is not None:
            if self.alpha_C.shape[0] != z_NC.shape[1]:
                raise ValueError(f"FocalLoss: alpha has {self.alpha_C.shape[0]} weights for {z_NC.shape[1]} classes")
            loss_N = loss_N * self.alpha_C.to(z_NC.device)[y_N]
        return loss_N, y_N == 1

    def _modulate(self, ce_N: torch.Tensor, log_one_minus_p_N: torch.Tensor) -> torch.Tensor:
        if self.gamma == 0.0:
            return ce_N
        return torch.exp(self.gamma * log_one_minus_p_N) * ce_N

    def extra_repr(self) -> str:
        alpha = self.alpha_scalar if self.alpha_C is None else self.alpha_C.tolist()
        return f"alpha={alpha}, gamma={self.gamma}, reduction={self.reduction!r}"
