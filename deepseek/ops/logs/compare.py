"""Comparing two slices of a log (two time windows, two versions, canary vs stable) with 95 % confidence intervals.

    a, b = Selection.parse("12:00-12:30"), Selection.parse("model=chat,version=2")   # or "START..END" (ISO/epoch)
    side = CompareSide(a, seed=0); side.add(total_ms, error)                # streaming: a bounded reservoir sample
    rows = compare_sides(side_a, side_b)                                    # p50, p99, mean, error rate: B - A

Each difference's interval is a percentile bootstrap over the two reservoir samples (``scipy.stats.bootstrap``,
``method='percentile'``; its default BCa needs a jackknife of n extra evaluations per sample, which costs more than
the whole analysis at n = 5,000), seeded. A difference whose interval excludes 0 is flagged as a real change.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np

from deepseek.ops.logs.access_log import LogReadError, parse_clock, parse_instant, utc
from deepseek.ops.logs.sketch import LogSketch

RESERVOIR = 5000
RESAMPLES = 2000
CONFIDENCE = 0.95
SELECTABLE_FIELDS = ("model", "version", "route", "adapter", "variant", "status", "client", "protocol")


@dataclass(frozen=True)
class Selection:
    """Which lines a side of a comparison takes: a time-of-day range (UTC), an absolute time range, or
    field=value[,field=value...] (all must hold; values compared as text)."""

    text: str
    fields: tuple = ()  # ((name, value), ...)
    start: float = -math.inf  # epoch seconds, or seconds since midnight when ``clock``
    end: float = math.inf
    clock: bool = False

    @classmethod
    def parse(cls, text: str) -> "Selection":
        if "=" in text:
            fields = []
            for part in text.split(","):
                name, equals, value = part.partition("=")
                if not equals or name not in SELECTABLE_FIELDS:
                    raise LogReadError(f"--compare {text!r}: write FIELD=VALUE[,FIELD=VALUE], each field one of "
                                       f"{', '.join(SELECTABLE_FIELDS)}")
                fields.append((name, value))
            return cls(text, fields=tuple(fields))
        if ".." in text:
            start, _, end = text.partition("..")
            return cls._range(text, parse_instant(start), parse_instant(end), clock=False)
        start, dash, end = text.partition("-")
        if dash:
            a, b = parse_clock(start), parse_clock(end)
            if a is not None and b is not None:
                return cls._range(text, a, b, clock=True)
        raise LogReadError(f"--compare {text!r}: write HH:MM-HH:MM (time of day, UTC), START..END (ISO date-times "
                           "or epoch seconds) or FIELD=VALUE (e.g. version=2, variant=canary)")

    @classmethod
    def _range(cls, text: str, start: float, end: float, clock: bool) -> "Selection":
        if not end > start:
            raise LogReadError(f"--compare {text!r}: the end must come after the start")
        return cls(text, start=start, end=end, clock=clock)

    def matches(self, record: dict, t: float) -> bool:
        if self.fields:
            for name, wanted in self.fields:
                value = record.get(name)
                if value is None or str(value) != wanted:
                    return False
            return True
        if self.clock:
            t = t % 86400.0
        return self.start <= t < self.end

    def describe(self) -> str:
        if self.fields or self.clock:
            return self.text
        return f"{utc(self.start)} .. {utc(self.end)}"


class CompareSide:
    """One side's exact count, errors and latency sketch, and a uniform reservoir sample (Algorithm R, seeded)."""

    def __init__(self, selection: Selection, seed: int = 0, size: int = RESERVOIR):
        self.selection = selection
        self.sketch = LogSketch()
        self.errors = 0
        self.size = size
        self.sample_ms: list[float] = []
        self.sample_err: list[bool] = []
        self.rng = random.Random(seed)

    def add(self, total_ms: float, error: bool) -> None:
        self.sketch.add(total_ms)
        self.errors += error
        n = self.sketch.count
        if n <= self.size:
            self.sample_ms.append(total_ms)
            self.sample_err.append(error)
        else:
            j = int(self.rng.random() * n)
            if j < self.size:
                self.sample_ms[j], self.sample_err[j] = total_ms, error

    def summary(self) -> dict:
        s = self.sketch
        return {"selection": self.selection.describe(), "requests": s.count,
                "p50_ms": s.quantile(0.5) if s.count else None, "p99_ms": s.quantile(0.99) if s.count else None,
                "mean_ms": s.mean if s.count else None, "error_rate": self.errors / s.count if s.count else None,
                "sample": len(self.sample_ms)}


STATISTICS: dict[str, tuple[str, Callable]] = {
    "p50_ms": ("latency", lambda x, axis: np.quantile(x, 0.5, axis=axis)),
    "p99_ms": ("latency", lambda x, axis: np.quantile(x, 0.99, axis=axis)),
    "mean_ms": ("latency", lambda x, axis: np.mean(x, axis=axis)),
    "error_rate": ("errors", lambda x, axis: np.mean(x, axis=axis)),
}


def bootstrap_difference(a: np.ndarray, b: np.ndarray, statistic: Callable, seed: int = 0,
                         n_resamples: int = RESAMPLES) -> tuple[float, float]:
    """The 95 % percentile-bootstrap interval of ``statistic(b) - statistic(a)`` (independent samples)."""
    def difference(x, y, axis=-1):
        return statistic(y, axis) - statistic(x, axis)

    try:
        from scipy.stats import bootstrap
    except ImportError:  # our own percentile bootstrap: the same method, in chunks to bound memory
        rng = np.random.default_rng(seed)
        diffs = []
        for start in range(0, n_resamples, 200):
            k = min(200, n_resamples - start)
            xa = a[rng.integers(0, len(a), (k, len(a)))]
            xb = b[rng.integers(0, len(b), (k, len(b)))]
            diffs.append(difference(xa, xb, axis=-1))
        lo, hi = np.quantile(np.concatenate(diffs), [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
        return float(lo), float(hi)
    result = bootstrap((a, b), difference, n_resamples=n_resamples, confidence_level=CONFIDENCE, method="percentile",
                       vectorized=True, paired=False, batch=200, rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def compare_sides(a: CompareSide, b: CompareSide, seed: int = 0, n_resamples: int = RESAMPLES) -> dict:
    """Both sides' summaries and, per statistic, B - A with its 95 % interval and whether it excludes 0."""
    result = {"a": a.summary(), "b": b.summary(), "method": "percentile bootstrap (scipy.stats.bootstrap), "
              f"{n_resamples} resamples of reservoir samples of <= {a.size} lines per side, seed {seed}",
              "differences": {}}
    if not a.sample_ms or not b.sample_ms:
        return result
    arrays = {"latency": (np.asarray(a.sample_ms), np.asarray(b.sample_ms)),
              "errors": (np.asarray(a.sample_err, dtype=float), np.asarray(b.sample_err, dtype=float))}
    for name, (kind, statistic) in STATISTICS.items():
        xa, xb = arrays[kind]
        diff = float(statistic(xb, -1) - statistic(xa, -1))
        if np.all(xa == xa[0]) and np.all(xb == xb[0]):  # constant samples (no errors at all): no spread to resample
            low = high = diff
        else:
            low, high = bootstrap_difference(xa, xb, statistic, seed, n_resamples)
        result["differences"][name] = {"difference": diff, "ci_low": low, "ci_high": high,
                                       "significant": bool(low > 0 or high < 0)}
    return result
