"""``ds logs`` output: rich tables for the terminal, one-line findings, and the JSON file.

    print_report(report, console)        # latency per group, the long tail, outliers, the comparison, bad lines
    write_report_json(report, "logs.json")
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table
from rich.text import Text

from deepseek.atomic import write_json_atomically
from deepseek.ops.logs.access_log import utc

OUTLIER_FIELDS = ("model", "version", "route", "status", "queue_ms", "compute_ms", "batch_size", "tokens_in")


def _ms(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.3f}"


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _pct0(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _num(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1f}"


def tail_finding(name: str, tail: dict) -> str:
    """One sentence: how big the tail is, what dominates it, and when it happened."""
    share, rest = tail["share"], tail["rest_share"]
    dominant = tail["dominant"]
    text = (f"{name}: the slowest {100 * (1 - tail['quantile']):.0f}% (>= {_ms(tail['threshold_ms'])} ms, "
            f"{tail['requests']:,} requests) ")
    if share["queue"] + share["compute"] == 0:  # generation routes log tokens and ttft, not queue/compute
        text += "has no queue/compute times logged"
    else:
        text += (f"is {dominant}-dominated: {_pct0(share[dominant])} {dominant} vs {_pct0(rest[dominant])} in the "
                 "rest")
    tokens = tail["tokens_in"]
    if tokens["tail"] is not None and tokens["rest"]:
        text += f"; {tokens['tail']:.0f} tokens in vs {tokens['rest']:.0f}"
    batch = tail["batch_size"]
    if batch["tail"] is not None and batch["rest"] and batch["rest"] != 1:
        text += f"; batch {batch['tail']:.1f} vs {batch['rest']:.1f}"
    span = tail.get("concentration")
    if span:
        clock = slice(11, 16) if span["start"] % 60 == 0 and span["end"] % 60 == 0 else slice(11, 19)
        text += (f"; {_pct0(span['share_of_tail'])} of it in {utc(span['start'])[clock]}-{utc(span['end'])[clock]} "
                 f"UTC, which holds {_pct0(span['share_of_requests'])} of all requests")
    return text


def print_report(report: dict, console: Optional[Console] = None, outliers: int = 10) -> None:
    console = console or Console()
    for item in report_renderables(report, outliers):
        console.print(item)


def report_renderables(report: dict, outliers: int = 10) -> list:
    """The report as rich renderables, in order (``--follow`` shows them in a Live display)."""
    items: list = []
    groups = report["groups"]
    span = (f"{min(g['first'] for g in groups.values())} .. {max(g['last'] for g in groups.values())} UTC"
            if groups else "no records")
    table = Table(title=f"latency by {report['by']} (ms; quantiles within {100 * report['relative_error']:.0f}%)",
                  title_justify="left", caption=span)
    for column in (report["by"], "requests", "req/s", "errors", "p50", "p90", "p99", "p99.9", "max"):
        table.add_column(column, justify="left" if column == report["by"] else "right")
    for name, g in groups.items():
        table.add_row(name, f"{g['requests']:,}", f"{g['per_s']:.1f}", _pct(g["error_rate"]), _ms(g["p50_ms"]),
                      _ms(g["p90_ms"]), _ms(g["p99_ms"]), _ms(g["p999_ms"]), _ms(g["max_ms"]))
    items.append(table)

    tail = Table(title="the slowest 1% against the rest (tail/rest; time shares of total_ms)", title_justify="left")
    for column in (report["by"], "from ms", "requests", "queue/compute/other", "(rest)", "batch", "tokens in",
                   "errors", "80% of it in (UTC)"):
        tail.add_column(column, justify="left" if column in (report["by"], "80% of it in (UTC)") else "right")
    for name, g in groups.items():
        t = g["tail"]
        if not t:
            continue
        w = t.get("concentration")
        window = (f"{utc(w['start'])[11:16]}-{utc(w['end'])[11:16]} ({_pct0(w['share_of_requests'])} of requests)"
                  if w else "-")
        tail.add_row(name, _ms(t["threshold_ms"]), f"{t['requests']:,}",
                     "/".join(f"{100 * t['share'][k]:.0f}" for k in ("queue", "compute", "other")) + "%",
                     "/".join(f"{100 * t['rest_share'][k]:.0f}" for k in ("queue", "compute", "other")) + "%",
                     f"{_num(t['batch_size']['tail'])}/{_num(t['batch_size']['rest'])}",
                     f"{_num(t['tokens_in']['tail'])}/{_num(t['tokens_in']['rest'])}",
                     f"{_pct0(t['error_rate']['tail'])}/{_pct0(t['error_rate']['rest'])}", window)
    items.append(tail)
    for name, g in groups.items():
        if g["tail"] and name != "(all)":
            items.append(tail_finding(name, g["tail"]))

    everything = groups.get("(all)") or next(iter(groups.values()), None)
    if everything and everything["tail"] and outliers:
        out = Table(title=f"outliers: the {outliers} slowest requests", title_justify="left")
        out.add_column("time")
        out.add_column("total", justify="right")
        for f in OUTLIER_FIELDS:
            out.add_column(f, justify="right" if f.endswith(("_ms", "_size", "_in")) else "left")
        for record in everything["tail"]["outliers"][:outliers]:
            out.add_row(utc(record["time"])[11:], _ms(record["total_ms"]),
                        *(_ms(record.get(f)) if f.endswith("_ms") else str(record.get(f, "-") if record.get(f)
                          is not None else "-") for f in OUTLIER_FIELDS))
        items.append(out)

    if "compare" in report:
        items.append(comparison_table(report["compare"]))
    bad = report["bad_lines"]
    if bad["count"]:
        items.append(f"[yellow]{bad['count']:,} of {report['lines']:,} lines could not be read[/yellow]; the first:")
        for b in bad["first"]:
            items.append(Text(f"  {b['path']}:{b['line']}: {b['reason']}: {b['text']}"))
    if report["outside_time_range"]:
        items.append(f"{report['outside_time_range']:,} lines outside --since/--until were skipped")
    return items


def comparison_table(compare: dict) -> Table:
    a, b = compare["a"], compare["b"]
    table = Table(title=f"A = {a['selection']} ({a['requests']:,} requests) vs B = {b['selection']} "
                        f"({b['requests']:,} requests)", title_justify="left", caption=compare["method"])
    for column in ("", "A", "B", "B - A", "95% CI", ""):
        table.add_column(column, justify="right")
    for name, d in compare["differences"].items():
        fmt = _pct if name == "error_rate" else _ms
        signed = (lambda x: f"{'+' if x >= 0 else '-'}{fmt(abs(x))}")
        table.add_row(name.replace("_ms", ""), fmt(a[name]), fmt(b[name]), signed(d["difference"]),
                      f"[{signed(d['ci_low'])}, {signed(d['ci_high'])}]",
                      "[bold red]changed[/bold red]" if d["significant"] else "no clear change")
    if not compare["differences"]:
        table.add_row("(a side selected no lines)", "", "", "", "", "")
    return table


def write_report_json(report: dict, path: str | Path) -> Path:
    return write_json_atomically(path, report)
