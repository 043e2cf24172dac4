"""What a run reports: ``metrics.jsonl`` (one JSON object per record), TensorBoard scalars, Prometheus gauges
(opt-in, :mod:`deepseek.train.prometheus`), a progress bar."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class MetricsLog:
    """Appends records to ``run_dir/metrics.jsonl`` and mirrors numeric fields to TensorBoard and, with a
    ``metrics_port``, to Prometheus gauges served on ``metrics_host:metrics_port/metrics``."""

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, metrics_port: int = 0,
                 metrics_host: str = "127.0.0.1"):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = None
        self._writer = None
        self._exporter = None
        if metrics_port:
            from deepseek.train.prometheus import training_exporter
            self._exporter = training_exporter(metrics_host, metrics_port)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency, but a trimmed install still trains
                SummaryWriter = None
            if SummaryWriter is not None:
                self._writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Forget records past ``step``: a resumed run rewrites them, so the file reads as one run."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        if self._file is None:
            self._file = open(self.path, "a")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._exporter is not None:
            self._exporter.update(record)
        if self._writer is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._writer.add_scalar(key.replace("val_", "val/") if key.startswith("val_") else f"train/{key}",
                                            value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class StepProgress:
    """A progress bar of optimizer steps with loss, tokens/s, lr, grad norm and ETA.

    On a terminal it redraws in place; elsewhere (CI logs, pipes) it prints one line per update instead,
    so long runs still show they are alive.
    """

    def __init__(self, total: int, start: int = 0, *, enabled: bool = True, console: Optional[Console] = None,
                 unit: str = "tok/s"):
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.live = enabled and self.console.is_terminal
        self.total, self.unit = total, unit
        self._last_time = time.perf_counter()
        self._last_step = start
        self._progress: Optional[Progress] = None
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console)
            self._task = self._progress.add_task("train", total=total, completed=start, stats="")
            self._progress.start()

    def update(self, step: int, stats: dict[str, float]) -> None:
        text = _format_stats(stats, self.unit)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, stats=text)
        elif self.enabled:
            # The pace of the last interval, not of the whole run: a curriculum changes the cost of a step.
            now = time.perf_counter()
            done = step - self._last_step
            eta = (now - self._last_time) / done * (self.total - step) if done else float("nan")
            self._last_time, self._last_step = now, step
            self.console.print(f"step {step}/{self.total}  {text}  eta {eta:.0f}s", highlight=False)

    def set_total(self, total: int) -> None:
        """The run's length changed (a time budget planned it): the bar and the ETA follow."""
        self.total = total
        if self._progress is not None:
            self._progress.update(self._task, total=total)

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _format_stats(stats: dict[str, float], unit: str) -> str:
    parts = []
    if "loss" in stats:
        parts.append(f"loss {stats['loss']:.4f}")
    if "throughput" in stats:
        parts.append(f"{stats['throughput']:,.0f} {unit}")
    if "lr" in stats:
        parts.append(f"lr {stats['lr']:.2e}")
    if "grad_norm" in stats:
        parts.append(f"gnorm {stats['grad_norm']:.3f}")
    return "  ".join(parts)
