"""Reporting: confusion matrices, the results table, the confusion-matrix picture."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch


def confusion_matrix(labels: torch.Tensor, predicted: torch.Tensor, n_classes: int = 10) -> torch.Tensor:
    """[true, predicted] counts."""
    return torch.bincount(labels * n_classes + predicted, minlength=n_classes ** 2).view(n_classes, n_classes)


def print_table(console, title: str, rows: dict[str, dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("model")
    table.add_column("test accuracy", justify="right")
    table.add_column("parameters", justify="right")
    for name, row in rows.items():
        params = row.get("parameters")
        table.add_row(name, f"{row['accuracy']:.4f}", f"{params:,}" if params else "")
    console.print(table)


def plot_confusion(matrix: torch.Tensor, path: Path, title: str) -> Optional[Path]:
    """The matrix as a PNG heat map with counts; None without matplotlib."""
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot, no GUI backend
    except ImportError:
        return None
    n = matrix.shape[0]
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    ax.imshow(matrix.numpy(), cmap="Blues")
    for i in range(n):
        for j in range(n):
            count = int(matrix[i, j])
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                        color="white" if count > matrix.max() / 2 else "black")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("true digit")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
