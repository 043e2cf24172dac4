"""The baselines a practitioner reaches for first: scikit-learn on the raw pixels of the same split.

Features are the 64 original pixels scaled to 0..1 (upsampling adds no information for a linear model or an
RBF kernel). Logistic regression (lbfgs, C=1) and an RBF SVC with scikit-learn's defaults (C=1, gamma="scale").
"""

from __future__ import annotations

import numpy as np


def train_sklearn_baselines(split: dict[str, np.ndarray]) -> dict[str, float]:
    """{"logistic-regression": test accuracy, "svc-rbf": test accuracy}."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    x_train = split["x_train"].reshape(len(split["x_train"]), -1) / 255.0
    x_test = split["x_test"].reshape(len(split["x_test"]), -1) / 255.0
    models = {"logistic-regression": LogisticRegression(max_iter=2000), "svc-rbf": SVC()}
    return {name: float(model.fit(x_train, split["y_train"]).score(x_test, split["y_test"]))
            for name, model in models.items()}
