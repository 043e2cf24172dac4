"""A run's loss curve as a PNG: training loss per logged step, validation loss per evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from deepseek.train.metrics import read_metrics


def plot_loss_curve(run_dir: str | Path, path: Optional[str | Path] = None, title: str = "") -> Path:
    """Draw ``run_dir/metrics.jsonl`` into ``path`` (default ``run_dir/loss.png``) and return the path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    path = Path(path) if path is not None else Path(run_dir) / "loss.png"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label="training loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", linewidth=2)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title or str(run_dir))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
