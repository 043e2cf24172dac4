"""One streaming pass over access-log lines: groups, the long tail, a two-sided comparison, the bad lines.

    analyzer = LogAnalyzer(by="model", window_s=60, compare=("version=1", "version=2"))
    analyzer.feed(read_lines(paths))          # any iterable of (path, lineno, raw line); call again to add more
    report = analyzer.report()                # a JSON-able dict (see docs/operations.md)

Memory is bounded by the number of groups, latency buckets and time windows (each capped), not by the lines.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

from deepseek.ops.logs.access_log import BadLines, LogReadError, is_error, parse_line, utc
from deepseek.ops.logs.compare import RESERVOIR, CompareSide, Selection, compare_sides
from deepseek.ops.logs.groups import GroupStats
from deepseek.ops.logs.longtail import explain_tail

GROUP_FIELDS = ("model", "version", "route", "adapter", "variant", "status", "client", "protocol")
QUANTILES = (0.5, 0.9, 0.99, 0.999)
ALL = "(all)"
MAX_GROUPS = 1000  # past this many distinct values (e.g. --by client on a busy server) the rest share one group
OTHER = "(other)"


class LogAnalyzer:
    def __init__(self, by: str = "model", window_s: float = 60.0, since: Optional[float] = None,
                 until: Optional[float] = None, compare: Optional[Sequence[str]] = None, top_n: int = 10,
                 seed: int = 0, reservoir: int = RESERVOIR):
        if by not in GROUP_FIELDS:
            raise LogReadError(f"--by {by!r}: group by one of {', '.join(GROUP_FIELDS)}")
        if since is not None and until is not None and until <= since:
            raise LogReadError("--until must come after --since")
        self.by, self.window_s, self.top_n, self.seed = by, window_s, top_n, seed
        self.since = -math.inf if since is None else since
        self.until = math.inf if until is None else until
        self.groups: dict[str, GroupStats] = {}
        self.bad = BadLines()
        self.lines = 0
        self.skipped = 0  # records outside --since/--until
        self.sides: Optional[tuple[CompareSide, CompareSide]] = None
        if compare:
            if len(compare) != 2:
                raise LogReadError("--compare takes two selections, A and B")
            a, b = (Selection.parse(text) for text in compare)
            self.sides = (CompareSide(a, seed, reservoir), CompareSide(b, seed + 1, reservoir))

    def feed(self, lines: Iterable[tuple[str, int, bytes]]) -> None:
        by, groups, since, until, sides = self.by, self.groups, self.since, self.until, self.sides
        for path, lineno, line in lines:
            self.lines += 1
            record = parse_line(line)
            if type(record) is str:
                self.bad.add(path, lineno, record, line)
                continue
            t = record["time"]
            if t < since or t >= until:
                self.skipped += 1
                continue
            total = record["total_ms"]
            error = is_error(record.get("status"))
            key = record.get(by)
            key = "-" if key is None else str(key)
            stats = groups.get(key)
            if stats is None:
                if len(groups) >= MAX_GROUPS:
                    key = OTHER
                stats = groups.get(key)
                if stats is None:
                    stats = groups[key] = GroupStats(self.window_s, self.top_n)
            stats.add(record, t, total, error)
            if sides is not None:
                for side in sides:
                    if side.selection.matches(record, t):
                        side.add(total, error)

    def overall(self) -> GroupStats:
        """Every group merged (the sketches and aggregates are mergeable: no second pass)."""
        total = GroupStats(self.window_s, self.top_n)
        for stats in self.groups.values():
            total.merge(stats)
        return total

    def report(self, n_resamples: int = 2000) -> dict:
        rows = dict(sorted(self.groups.items()))
        if len(rows) > 1:
            rows[ALL] = self.overall()
        groups = {}
        for name, stats in rows.items():
            p = stats.sketch.quantiles(QUANTILES)
            span = max(stats.last_t - stats.first_t, stats.window_s)
            groups[name] = {
                "requests": stats.count, "errors": stats.errors, "error_rate": stats.errors / stats.count,
                "per_s": stats.count / span, "mean_ms": stats.sketch.mean, "max_ms": stats.sketch.max,
                "p50_ms": p[0], "p90_ms": p[1], "p99_ms": p[2], "p999_ms": p[3],
                "first": utc(stats.first_t), "last": utc(stats.last_t),
                "histogram": [[lo, hi, n] for lo, hi, n in stats.sketch.buckets()],
                "series": stats.series(), "window_s": stats.window_s,
                "tail": explain_tail(stats),
            }
        report = {
            "by": self.by, "lines": self.lines, "records": sum(s.count for s in self.groups.values()),
            "outside_time_range": self.skipped,
            "bad_lines": {"count": self.bad.count, "first": self.bad.first},
            "relative_error": 0.01, "quantiles": list(QUANTILES), "window_s": self.window_s, "groups": groups,
        }
        if self.sides is not None:
            report["compare"] = compare_sides(*self.sides, seed=self.seed, n_resamples=n_resamples)
        return report
