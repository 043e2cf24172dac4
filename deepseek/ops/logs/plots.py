"""``ds logs --plots DIR``: the latency histogram per group on a log axis, and p50/p99, throughput and error rate
over time (matplotlib, Agg; each PNG written atomically)."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

from deepseek.atomic import write_file_atomically

ALL = "(all)"


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return write_file_atomically(path, buffer.getvalue())


def _groups(report: dict) -> dict:
    return {k: g for k, g in report["groups"].items() if k != ALL} or report["groups"]


def plot_histograms(report: dict, path: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    for i, (name, g) in enumerate(_groups(report).items()):
        edges = [lo for lo, _, _ in g["histogram"]] + [g["histogram"][-1][1]]
        counts = [n / g["requests"] for _, _, n in g["histogram"]]
        color = f"C{i % 10}"
        ax.stairs(counts, edges, label=f"{name} (p50 {g['p50_ms']:.3g}, p99 {g['p99_ms']:.3g} ms)", color=color)
        ax.axvline(g["p99_ms"], color=color, linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("request latency (ms, log scale; dotted: p99)")
    ax.set_ylabel("share of requests per 2% bucket")
    ax.set_title(f"latency distribution by {report['by']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


def plot_timeline(report: dict, path: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    fig, (lat, rate, err) = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
    for i, (name, g) in enumerate(_groups(report).items()):
        series = g["series"]
        when = [dt.datetime.fromtimestamp(r["start"], dt.timezone.utc) for r in series]
        color = f"C{i % 10}"
        lat.plot(when, [r["p50_ms"] for r in series], color=color, label=f"{name} p50")
        lat.plot(when, [r["p99_ms"] for r in series], color=color, linestyle="--", label=f"{name} p99")
        rate.plot(when, [r["per_s"] for r in series], color=color, label=name)
        err.plot(when, [100 * r["error_rate"] for r in series], color=color, label=name)
    lat.set_yscale("log")
    lat.set_ylabel("latency (ms)")
    lat.legend(fontsize=7, ncol=3)
    rate.set_ylabel("requests/s")
    err.set_ylabel("errors (%)")
    err.set_xlabel(f"time (UTC), {report['window_s']:g} s windows")
    err.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M", tz=dt.timezone.utc))
    lat.set_title(f"p50 / p99, throughput and error rate over time, by {report['by']}")
    fig.tight_layout()
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


def write_plots(report: dict, folder: str | Path) -> list[Path]:
    """Both PNGs into ``folder``: logs-latency.png and logs-timeline.png."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not report["groups"]:
        return []
    return [plot_histograms(report, folder / "logs-latency.png"), plot_timeline(report, folder / "logs-timeline.png")]
