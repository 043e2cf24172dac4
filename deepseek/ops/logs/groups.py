"""What ``ds logs`` keeps per group (a model, version, route ...): bounded by buckets and windows, never by lines.

    stats = GroupStats(window_s=60)
    stats.add(record, t, total_ms, error)      # one parsed line
    stats.merge(other)                         # the "all" row is the merge of every group

Per latency bucket of the sketch it keeps sums of total, queue, compute, batch size and input tokens, the error
count and an hour-of-day histogram, so the slowest 1 % (the buckets at and above p99) can be explained after one pass
(:mod:`deepseek.ops.logs.longtail`), accurate to the bucket width. Per time window it keeps the count, the errors
and a coarser (2 %) sketch, for throughput, error rate and p50/p99 over time; past ``MAX_WINDOWS`` windows their
width doubles. The slowest ``top_n`` lines themselves are kept in a heap.
"""

from __future__ import annotations

import heapq
from typing import Optional

from deepseek.ops.logs.sketch import LogSketch

MAX_WINDOWS = 720  # points enough for a plot; a day of 2-minute windows
WINDOW_RELATIVE_ERROR = 0.02
# per-bucket aggregate slots
COUNT, TOTAL, QUEUE, COMPUTE, BATCH, BATCH_N, TOKENS, TOKENS_N, ERRORS = range(9)
SLOTS = 9
_NUMBER = (int, float)


class GroupStats:
    __slots__ = ("window_s", "top_n", "sketch", "aggregates", "hours", "windows", "slowest", "errors", "first_t",
                 "last_t", "_seq")

    def __init__(self, window_s: float = 60.0, top_n: int = 10):
        self.window_s = window_s
        self.top_n = top_n
        self.sketch = LogSketch()
        self.aggregates: dict[int, list] = {}  # bucket -> SLOTS sums
        self.hours: dict[int, list[int]] = {}  # bucket -> 24 counts (UTC hour of day)
        self.windows: dict[int, list] = {}     # window number -> [count, errors, {bucket: count}]
        self.slowest: list = []                # min-heap of (total_ms, seq, record)
        self.errors = 0
        self.first_t = float("inf")
        self.last_t = float("-inf")
        self._seq = 0

    def add(self, record: dict, t: float, total: float, error: bool) -> None:
        index = self.sketch.add(total)
        agg = self.aggregates.get(index)
        if agg is None:
            agg = self.aggregates[index] = [0] * SLOTS
            self.hours[index] = [0] * 24
        agg[COUNT] += 1
        agg[TOTAL] += total
        queue = record.get("queue_ms")
        if type(queue) in _NUMBER:
            agg[QUEUE] += queue
        compute = record.get("compute_ms")
        if type(compute) in _NUMBER:
            agg[COMPUTE] += compute
        batch = record.get("batch_size")
        if type(batch) in _NUMBER:
            agg[BATCH] += batch
            agg[BATCH_N] += 1
        tokens = record.get("tokens_in")
        if type(tokens) in _NUMBER:
            agg[TOKENS] += tokens
            agg[TOKENS_N] += 1
        if error:
            agg[ERRORS] += 1
            self.errors += 1
        self.hours[index][int(t // 3600) % 24] += 1
        if t < self.first_t:
            self.first_t = t
        if t > self.last_t:
            self.last_t = t

        w = int(t // self.window_s)
        window = self.windows.get(w)
        if window is None:
            if len(self.windows) >= MAX_WINDOWS:
                self._coarsen()
                w = int(t // self.window_s)
            window = self.windows.get(w)
            if window is None:
                window = self.windows[w] = [0, 0, LogSketch(WINDOW_RELATIVE_ERROR)]
        window[0] += 1
        window[1] += error
        window[2].add(total)

        slowest = self.slowest
        if len(slowest) < self.top_n:
            self._seq += 1
            heapq.heappush(slowest, (total, self._seq, record))
        elif total > slowest[0][0]:
            self._seq += 1
            heapq.heapreplace(slowest, (total, self._seq, record))

    def _coarsen(self) -> None:
        """Double the window width, merging neighbours: the number of windows stays under MAX_WINDOWS."""
        self.window_s *= 2
        merged: dict[int, list] = {}
        for w, (count, errors, sketch) in self.windows.items():
            target = merged.get(w // 2)
            if target is None:
                merged[w // 2] = [count, errors, sketch]
            else:
                target[0] += count
                target[1] += errors
                target[2].merge(sketch)
        self.windows = merged

    def merge(self, other: "GroupStats") -> "GroupStats":
        """Add ``other`` into this one (same window width); returns self."""
        while other.window_s > self.window_s:
            self._coarsen()
        while self.window_s > other.window_s:
            other._coarsen()
        self.sketch.merge(other.sketch)
        for index, agg in other.aggregates.items():
            mine = self.aggregates.setdefault(index, [0] * SLOTS)
            hours = self.hours.setdefault(index, [0] * 24)
            for i in range(SLOTS):
                mine[i] += agg[i]
            for h, n in enumerate(other.hours[index]):
                hours[h] += n
        for w, (count, errors, sketch) in other.windows.items():
            mine = self.windows.get(w)
            if mine is None:
                self.windows[w] = [count, errors, LogSketch(WINDOW_RELATIVE_ERROR).merge(sketch)]
            else:
                mine[0] += count
                mine[1] += errors
                mine[2].merge(sketch)
        while len(self.windows) > MAX_WINDOWS:
            self._coarsen()
        for item in other.slowest:
            self._seq += 1
            entry = (item[0], self._seq, item[2])
            if len(self.slowest) < self.top_n:
                heapq.heappush(self.slowest, entry)
            elif entry[0] > self.slowest[0][0]:
                heapq.heapreplace(self.slowest, entry)
        self.errors += other.errors
        self.first_t = min(self.first_t, other.first_t)
        self.last_t = max(self.last_t, other.last_t)
        return self

    @property
    def count(self) -> int:
        return self.sketch.count

    def outliers(self) -> list[dict]:
        """The slowest lines kept, slowest first."""
        return [record for _, _, record in sorted(self.slowest, key=lambda e: (-e[0], e[1]))]

    def series(self) -> list[dict]:
        """Per window, in time order: start (epoch s), requests, requests/s, error rate, p50 and p99 (ms)."""
        rows = []
        for w in sorted(self.windows):
            count, errors, sketch = self.windows[w]
            rows.append({"start": w * self.window_s, "requests": count, "per_s": count / self.window_s,
                         "error_rate": errors / count, "p50_ms": sketch.quantile(0.5),
                         "p99_ms": sketch.quantile(0.99)})
        return rows

    def window_count_at_or_above(self, threshold_ms: float) -> dict[int, int]:
        """Per window, how many of its lines are at or above ``threshold_ms`` (to the window sketch's bucket)."""
        out: dict[int, int] = {}
        for w, (_, _, sketch) in self.windows.items():
            n = sketch.count_at_or_above(sketch.index(threshold_ms))
            if n:
                out[w] = n
        return out

    def empty_copy(self, top_n: Optional[int] = None) -> "GroupStats":
        return GroupStats(self.window_s, self.top_n if top_n is None else top_n)
