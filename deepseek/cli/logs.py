"""``ds logs``: what the server's access log says — latency per model/version/route, the long tail explained,
two windows or versions compared, as tables, PNGs and JSON; ``--follow`` for a live view."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

FOLLOW_INTERVAL_S = 2.0


def register(app: typer.Typer) -> None:
    app.command("logs")(logs_command)


def logs_command(
    paths: list[Path] = typer.Argument(..., help="Access logs (JSON lines from `ds serve --access-log`; .gz too), "
                                                 "read in order as one log."),
    by: str = typer.Option("model", "--by", help="Group by model, version, route, adapter, variant, status, "
                                                 "client or protocol."),
    window: str = typer.Option("1m", "--window", help="Time window for throughput, error rate and p50/p99 over "
                                                      "time (30s, 1m, 5m, 1h)."),
    compare: Optional[tuple[str, str]] = typer.Option(None, "--compare", help="Compare two slices A B: "
                                                      "HH:MM-HH:MM (time of day, UTC), START..END (ISO or epoch "
                                                      "seconds) or FIELD=VALUE (version=2, variant=canary)."),
    since: Optional[str] = typer.Option(None, "--since", help="Only lines at or after this time (ISO date-time, "
                                                              "UTC unless zoned, or epoch seconds)."),
    until: Optional[str] = typer.Option(None, "--until", help="Only lines before this time."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the whole report as JSON here."),
    plots: Optional[Path] = typer.Option(None, "--plots", help="Write logs-latency.png and logs-timeline.png "
                                                               "into this folder."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep reading lines appended to the logs and show a "
                                                              "live summary (Ctrl-C stops)."),
    top: int = typer.Option(10, "--top", min=0, help="Outliers listed (the slowest requests)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the comparison's reservoir samples and bootstrap."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Analyse access logs: p50/p90/p99/p99.9 and histograms per group, throughput and errors over time, the
    slowest 1% explained (queue vs compute vs other, batch and input sizes, when), outliers, comparisons."""
    from rich.console import Console

    from deepseek.ops.logs.access_log import LogReadError, LogTail, parse_duration, parse_instant, read_lines
    from deepseek.ops.logs.analyze import LogAnalyzer
    from deepseek.ops.logs.report import print_report, write_report_json

    console = Console()
    if not console.is_terminal:  # piped into a file: the tables' width, not 80 columns
        console = Console(width=140)
    if compare is not None and None in compare:
        compare = None
    analyzer = LogAnalyzer(by=by, window_s=parse_duration(window),
                           since=parse_instant(since) if since else None,
                           until=parse_instant(until) if until else None,
                           compare=compare, top_n=max(top, 1), seed=seed)
    if follow:
        if any(p.suffix == ".gz" for p in paths):
            raise LogReadError("--follow reads plain files; a .gz log does not grow")
        tails = [LogTail(p) for p in paths]
        _follow(analyzer, tails, console, top)
    else:
        analyzer.feed(_with_progress(read_lines(paths), paths, quiet or not console.is_terminal))
    report = analyzer.report()
    print_report(report, console, outliers=top)
    if json_out is not None:
        write_report_json(report, json_out)
        console.print(f"report: {json_out}")
    if plots is not None:
        from deepseek.ops.logs.plots import write_plots

        for png in write_plots(report, plots):
            console.print(f"plot: {png}")


def _with_progress(lines, paths: list[Path], quiet: bool):
    """``lines`` passed through, with a progress bar over the files' bytes (compressed files: their size on disk)."""
    if quiet:
        yield from lines
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    total = sum(p.stat().st_size for p in paths if p.is_file())
    with Progress(TextColumn("reading"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  transient=True) as progress:
        task = progress.add_task("read", total=total)
        done = 0
        for n, item in enumerate(lines, 1):
            done += len(item[2])
            if n % 65536 == 0:
                progress.update(task, completed=done)
            yield item


def _follow(analyzer, tails, console, top: int) -> None:
    """Read what the files hold, then every FOLLOW_INTERVAL_S what was appended, re-rendering the summary."""
    from rich.console import Group
    from rich.live import Live

    from deepseek.ops.logs.report import report_renderables

    def render():
        report = analyzer.report(n_resamples=500)  # live: a coarser interval, refreshed often
        return Group(*report_renderables(report, outliers=top), "[dim]following; Ctrl-C stops[/dim]")

    for tail in tails:
        analyzer.feed(tail.read_new())
    try:
        with Live(render(), console=console, refresh_per_second=1, transient=True) as live:
            while True:
                time.sleep(FOLLOW_INTERVAL_S)  # a poll interval for new lines, not synchronisation
                new = [line for tail in tails for line in tail.read_new()]
                if new:
                    analyzer.feed(new)
                    live.update(render())
    except KeyboardInterrupt:
        pass
