"""Ranking metrics for rare positives: PR-AUC and recall at a fixed false-positive rate, threshold from validation.

PR-AUC is scikit-learn's ``average_precision_score`` (step-wise; the trapezoidal ``auc(recall, precision)`` can
be too optimistic). Recall at 1 % FPR: the threshold is the one that reaches the highest TPR with FPR <= 1 % on
the *validation* windows (``roc_curve``: entry i covers score >= thresholds[i]); the test TPR and the FPR it
actually reaches on test are reported, as an alert budget fixed in advance would see them.
"""

from __future__ import annotations

import numpy as np


def pr_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(labels, scores))


def threshold_at_fpr(labels: np.ndarray, scores: np.ndarray, max_fpr: float = 0.01) -> float:
    """The score threshold with the highest TPR whose FPR on (``labels``, ``scores``) is <= ``max_fpr``."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(labels, scores)
    ok = np.nonzero(fpr <= max_fpr)[0]
    best = ok[np.argmax(tpr[ok])]
    return float(min(thresholds[best], np.finfo(np.float64).max))


def rates_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float]:
    """(TPR, FPR) of flagging ``score >= threshold``."""
    flagged = scores >= threshold
    positives, negatives = labels == 1, labels == 0
    return float(flagged[positives].mean()) if positives.any() else float("nan"), float(flagged[negatives].mean())


def summary(val_labels, val_scores, test_labels, test_scores, max_fpr: float = 0.01) -> dict[str, float]:
    """PR-AUC on validation and test, and recall at ``max_fpr`` with the threshold chosen on validation."""
    threshold = threshold_at_fpr(val_labels, val_scores, max_fpr)
    tpr, fpr = rates_at(test_labels, test_scores, threshold)
    return {"val_pr_auc": pr_auc(val_labels, val_scores), "test_pr_auc": pr_auc(test_labels, test_scores),
            "threshold": threshold, "test_recall_at_1pct_fpr": tpr, "test_fpr_reached": fpr}
