"""The long tail explained: for the slowest 1 % of a group, where the time went and what those requests look like.

    explain_tail(stats)   # {"threshold_ms", "requests", "share": {queue, compute, other}, "rest_share": ...,
                          #  "batch_size": {tail, rest}, "tokens_in": {tail, rest}, "hours": ..., "windows": ...,
                          #  "dominant": "queue", "outliers": [...]}

The tail is every sketch bucket at and above the one holding the line of rank floor(0.99 n) (so "the slowest 1 %"
is exact to the bucket width, 2 %); its time splits into queue, compute and other = total - queue - compute (parsing, transfer, waiting on
the client; for generation routes, which log no queue/compute, all of it), as Triton's trace_summary splits a
request. It is compared with the rest of the group's lines, and located in time: the UTC hours of day and the
windows that hold most of it.
"""

from __future__ import annotations

import math

from deepseek.ops.logs.groups import BATCH, BATCH_N, COMPUTE, COUNT, ERRORS, QUEUE, SLOTS, TOKENS, TOKENS_N, TOTAL, \
    GroupStats

TAIL_QUANTILE = 0.99
TOP_WINDOWS = 3
CONCENTRATION = 0.8  # the shortest time span holding this share of the tail


def _sum(aggs) -> list:
    out = [0] * SLOTS
    for agg in aggs:
        for i in range(SLOTS):
            out[i] += agg[i]
    return out


def _shares(s: list) -> dict:
    if not s[TOTAL]:
        return {"queue": 0.0, "compute": 0.0, "other": 0.0}
    queue, compute = s[QUEUE] / s[TOTAL], s[COMPUTE] / s[TOTAL]
    return {"queue": queue, "compute": compute, "other": max(0.0, 1.0 - queue - compute)}


def _mean(total, n):
    return total / n if n else None


def shortest_span(per_window: dict[int, int], share: float = CONCENTRATION) -> tuple[int, int, int]:
    """``(first, last, count)``: the fewest consecutive windows holding ``share`` of the counts (two pointers)."""
    ws = sorted(per_window)
    need = share * sum(per_window.values())
    best = (ws[0], ws[-1], sum(per_window.values()))
    held, left = 0, 0
    for right, w in enumerate(ws):
        held += per_window[w]
        while held - per_window[ws[left]] >= need:
            held -= per_window[ws[left]]
            left += 1
        if held >= need and w - ws[left] < best[1] - best[0]:
            best = (ws[left], w, held)
    return best


def explain_tail(stats: GroupStats, quantile: float = TAIL_QUANTILE) -> dict:
    """The tail of ``stats`` (lines at or above its ``quantile``) against the rest."""
    if not stats.count:
        return {}
    # the slowest 1 % of n lines are ranks floor(0.99 n) .. n-1: 1 line of 100 (p99's rank, floor(0.99 (n-1)), is the
    # 99th fastest of 100, and taking its bucket would take ties with the fast lines)
    cut = stats.sketch.rank_index(min(stats.count - 1, math.floor(quantile * stats.count)))
    tail_buckets = [i for i in stats.aggregates if i >= cut]
    tail = _sum(stats.aggregates[i] for i in tail_buckets)
    rest = _sum(agg for i, agg in stats.aggregates.items() if i < cut)
    share, rest_share = _shares(tail), _shares(rest)
    dominant = max(share, key=share.get)

    hours_tail, hours_all = [0] * 24, [0] * 24
    for i, hours in stats.hours.items():
        for h, n in enumerate(hours):
            hours_all[h] += n
            if i >= cut:
                hours_tail[h] += n
    busiest_hour = max(range(24), key=lambda h: hours_tail[h])

    threshold = stats.sketch.lower_bound(cut)
    per_window = stats.window_count_at_or_above(threshold)
    top = sorted(per_window.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_WINDOWS]
    in_windows = sum(per_window.values())  # the windows' own (2 %) buckets: shares of their count, not tail[COUNT]
    windows = [{"start": w * stats.window_s, "end": (w + 1) * stats.window_s, "tail_requests": n,
                "share_of_tail": n / in_windows, "share_of_requests": stats.windows[w][0] / stats.count}
               for w, n in top]
    span = None
    if per_window:
        first, last, held = shortest_span(per_window)
        in_span = sum(n for w, (n, _, _) in stats.windows.items() if first <= w <= last)
        span = {"start": first * stats.window_s, "end": (last + 1) * stats.window_s, "share_of_tail": held / in_windows,
                "share_of_requests": in_span / stats.count}
    return {
        "quantile": quantile,
        "threshold_ms": threshold,
        "requests": tail[COUNT],
        "share": share,
        "rest_share": rest_share,
        "dominant": dominant,
        "mean_ms": {"tail": _mean(tail[TOTAL], tail[COUNT]), "rest": _mean(rest[TOTAL], rest[COUNT])},
        "mean_queue_ms": {"tail": _mean(tail[QUEUE], tail[COUNT]), "rest": _mean(rest[QUEUE], rest[COUNT])},
        "mean_compute_ms": {"tail": _mean(tail[COMPUTE], tail[COUNT]), "rest": _mean(rest[COMPUTE], rest[COUNT])},
        "batch_size": {"tail": _mean(tail[BATCH], tail[BATCH_N]), "rest": _mean(rest[BATCH], rest[BATCH_N])},
        "tokens_in": {"tail": _mean(tail[TOKENS], tail[TOKENS_N]), "rest": _mean(rest[TOKENS], rest[TOKENS_N])},
        "error_rate": {"tail": _mean(tail[ERRORS], tail[COUNT]), "rest": _mean(rest[ERRORS], rest[COUNT])},
        "hours_utc": {"tail": hours_tail, "all": hours_all},
        "busiest_hour_utc": {"hour": busiest_hour, "share_of_tail": hours_tail[busiest_hour] / tail[COUNT],
                             "share_of_requests": hours_all[busiest_hour] / stats.count},
        "windows": windows,
        "concentration": span,  # the shortest time span holding >= 80 % of the tail
        "outliers": stats.outliers(),
    }
