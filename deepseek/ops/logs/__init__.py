"""``ds logs``: latency distribution, throughput, error rate, the long tail and comparisons from the access log.

    from deepseek.ops.logs import LogAnalyzer, read_lines
    analyzer = LogAnalyzer(by="version", window_s=60, compare=("version=1", "version=2"))
    analyzer.feed(read_lines(["access.jsonl"]))
    report = analyzer.report()

Modules: access_log (reading, parsing, --follow), sketch (quantiles within 1 %), groups (per-group state),
longtail (the slowest 1 % explained), compare (two slices with bootstrap intervals), report (tables, JSON),
plots (PNGs), synthetic (logs with planted effects, for tests, docs and the benchmark).
"""

from deepseek.ops.logs.access_log import LogReadError, LogTail, parse_line, read_lines
from deepseek.ops.logs.analyze import LogAnalyzer
from deepseek.ops.logs.sketch import LogSketch

__all__ = ["LogAnalyzer", "LogReadError", "LogSketch", "LogTail", "parse_line", "read_lines"]
