"""A mergeable latency sketch with a stated relative error: log-spaced buckets, as DDSketch (arXiv 1908.10693).

    sketch = LogSketch(relative_error=0.01)
    sketch.add(12.5)                       # a latency in ms (anything > 0; <= MIN_VALUE counts as MIN_VALUE)
    sketch.quantile(0.99)                  # within 1 % of the true p99 (the sample value of rank floor(q*(n-1)))
    a.merge(b)                             # lossless: bucket counts add

Bucket ``i`` holds the values in ``(gamma**(i-1), gamma**i]`` with ``gamma = (1+a)/(1-a)``, and answers
``2*gamma**i/(gamma+1)``, which is within ``a`` of every value in it. Memory is the number of occupied buckets,
bounded by ``log(max/min)/log(gamma)`` (about 1,150 for 1 µs .. 3 hours at 1 %), not by the number of values; past
``max_buckets`` the lowest buckets are collapsed (the low quantiles lose accuracy first; the tail keeps it).
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator

MIN_VALUE = 1e-3  # 1 µs in ms: smaller values (and 0) share the lowest bucket
DEFAULT_RELATIVE_ERROR = 0.01
DEFAULT_MAX_BUCKETS = 2048


class LogSketch:
    """Counts per log-spaced bucket, plus count, sum, min and max (exact)."""

    __slots__ = ("relative_error", "gamma", "inv_log_gamma", "max_buckets", "counts", "count", "total", "min",
                 "max")

    def __init__(self, relative_error: float = DEFAULT_RELATIVE_ERROR, max_buckets: int = DEFAULT_MAX_BUCKETS):
        if not 0 < relative_error < 1:
            raise ValueError(f"relative_error must be in (0, 1), got {relative_error}")
        self.relative_error = relative_error
        self.gamma = (1 + relative_error) / (1 - relative_error)
        self.inv_log_gamma = 1.0 / math.log(self.gamma)
        self.max_buckets = max_buckets
        self.counts: dict[int, int] = {}
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf

    def index(self, value: float) -> int:
        """The bucket of ``value`` (ms)."""
        return math.ceil(math.log(value if value > MIN_VALUE else MIN_VALUE) * self.inv_log_gamma)

    def value(self, index: int) -> float:
        """What bucket ``index`` answers: within ``relative_error`` of every value it holds."""
        return 2.0 * self.gamma ** index / (self.gamma + 1.0)

    def lower_bound(self, index: int) -> float:
        return self.gamma ** (index - 1)

    def add(self, value: float, index: int | None = None) -> int:
        """Count ``value``; returns its bucket (callers that keep per-bucket aggregates reuse it)."""
        if index is None:
            index = self.index(value)
        counts = self.counts
        if index in counts:
            counts[index] += 1
        else:
            counts[index] = 1
            if len(counts) > self.max_buckets:
                index = self._collapse_lowest(index)
        self.count += 1
        self.total += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        return index

    def _collapse_lowest(self, index: int) -> int:
        lowest, second = sorted(self.counts)[:2]
        self.counts[second] += self.counts.pop(lowest)
        return second if index == lowest else index

    def merge(self, other: "LogSketch") -> "LogSketch":
        """Add ``other``'s counts (same relative error) into this sketch; returns self."""
        if other.gamma != self.gamma:
            raise ValueError("sketches of different relative errors cannot be merged")
        for index, n in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + n
        while len(self.counts) > self.max_buckets:
            self._collapse_lowest(min(self.counts))
        self.count += other.count
        self.total += other.total
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        return self

    def quantile_index(self, q: float) -> int:
        """The bucket holding the value of rank ``floor(q*(count-1))`` (0-based, ascending)."""
        return self.rank_index(math.floor(q * (self.count - 1)))

    def rank_index(self, rank: int) -> int:
        """The bucket holding the value of 0-based ascending ``rank``."""
        if not self.count:
            raise ValueError("quantile of an empty sketch")
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen > rank:
                return index
        return max(self.counts)

    def quantile(self, q: float) -> float:
        """The ``q`` quantile, within ``relative_error`` of the sample's (clamped to the exact min and max)."""
        return min(max(self.value(self.quantile_index(q)), self.min), self.max)

    def quantiles(self, qs: Iterable[float]) -> list[float]:
        return [self.quantile(q) for q in qs] if self.count else [math.nan for _ in qs]

    def count_at_or_above(self, index: int) -> int:
        return sum(n for i, n in self.counts.items() if i >= index)

    def buckets(self) -> Iterator[tuple[float, float, int]]:
        """``(lower, upper, count)`` per occupied bucket, ascending: the histogram."""
        for index in sorted(self.counts):
            yield self.lower_bound(index), self.gamma ** index, self.counts[index]

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan
