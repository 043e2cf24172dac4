"""``ds finetune report RUN_DIR``: a fine-tuning run's metrics.jsonl as one PNG of loss terms, rewards and KL.

Panels (each drawn only when the run logged something for it): the losses (``loss``, mixed runs' ``loss/<term>``,
evaluations' ``val_*loss``), the rewards (every figure with ``rewards/`` or ``accuracy`` in its name: GRPO's reward
functions, DPO's implicit rewards, a reward model's pair accuracy) and the KL to the reference (``kl``, ``rl/kl``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from deepseek.config import ConfigError
from deepseek.train.metrics import read_metrics

PANELS: list[tuple[str, str, Callable[[str], bool]]] = [
    ("losses", "loss", lambda key: key == "loss" or key.startswith("loss/") or
     (key.startswith("val_") and key.endswith("loss"))),
    ("rewards", "reward / accuracy", lambda key: "rewards/" in key or key.endswith("accuracy")),
    ("KL to the reference", "nats / token", lambda key: key == "kl" or key.endswith("/kl")),
]


def series(records: list[dict[str, Any]], wanted: Callable[[str], bool]) -> dict[str, list[tuple[int, float]]]:
    """key -> [(step, value)] of every numeric figure whose key ``wanted`` accepts, in the order first logged."""
    out: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in record.items():
            if key != "step" and wanted(key) and isinstance(value, (int, float)) and not isinstance(value, bool):
                out.setdefault(key, []).append((int(record["step"]), float(value)))
    return out


def plot_finetune_report(run_dir: str | Path, out: Optional[str | Path] = None) -> Path:
    """Draw ``run_dir/metrics.jsonl`` (see the module docstring) into ``out`` (default ``run_dir/report.png``)."""
    metrics = Path(run_dir) / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"{run_dir}: no metrics.jsonl (is it the run_dir of a `ds finetune run`?)")
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    panels = [(title, unit, found) for title, unit, wanted in PANELS if (found := series(records, wanted))]
    if not panels:
        raise ConfigError(f"{metrics} has no loss, reward or KL records to plot")
    out = Path(out) if out is not None else Path(run_dir) / "report.png"
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3 * len(panels)), dpi=110, sharex=True, squeeze=False)
    for ax, (title, unit, found) in zip(axes[:, 0], panels):
        for key, points in found.items():
            style = "o-" if key.startswith("val_") else "-"
            ax.plot(*zip(*points), style, label=key, linewidth=1.2, markersize=3)
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(str(run_dir), fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
