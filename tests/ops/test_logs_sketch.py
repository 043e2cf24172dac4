"""The latency sketch behind ``ds logs``: quantiles within the stated 1 % of numpy's, lossless merges, and a bucket
count bounded by the value range, not by how many values were added."""

import math

import numpy as np
import pytest

from deepseek.ops.logs.sketch import DEFAULT_RELATIVE_ERROR, MIN_VALUE, LogSketch

QS = (0.0, 0.1, 0.5, 0.9, 0.99, 0.999, 1.0)


def sketch_of(values) -> LogSketch:
    sketch = LogSketch()
    for v in values:
        sketch.add(float(v))
    return sketch


@pytest.mark.parametrize("kind", ["lognormal", "bimodal", "uniform"])
def test_quantiles_are_within_the_stated_relative_error_of_numpy(kind):
    rng = np.random.default_rng(0)
    values = {"lognormal": rng.lognormal(np.log(20), 1.2, 20_000),
              "bimodal": np.concatenate([rng.normal(10, 1, 15_000).clip(0.5), rng.normal(900, 50, 5_000)]),
              "uniform": rng.uniform(0.01, 5_000, 20_000)}[kind]
    sketch = sketch_of(values)
    for q in QS:
        exact = np.quantile(values, q, method="lower")  # the sample of rank floor(q (n-1)), as the sketch defines it
        assert abs(sketch.quantile(q) - exact) <= DEFAULT_RELATIVE_ERROR * exact + 1e-12, (kind, q)
    assert sketch.count == len(values) and sketch.mean == pytest.approx(values.mean())
    assert (sketch.min, sketch.max) == (values.min(), values.max())


def test_merge_equals_one_sketch_of_everything():
    rng = np.random.default_rng(1)
    a, b = rng.lognormal(2, 1, 3_000), rng.lognormal(4, 0.5, 2_000)
    merged = sketch_of(a).merge(sketch_of(b))
    whole = sketch_of(np.concatenate([a, b]))
    assert merged.counts == whole.counts and merged.count == whole.count
    assert [merged.quantile(q) for q in QS] == [whole.quantile(q) for q in QS]


def test_bucket_count_is_bounded_by_the_range_not_the_number_of_values():
    rng = np.random.default_rng(2)
    sketch = LogSketch()
    low, high = 0.1, 60_000.0  # 100 µs .. a minute
    bound = math.ceil(math.log(high / low) / math.log(sketch.gamma)) + 1
    sizes = []
    for _ in range(5):
        for v in np.exp(rng.uniform(math.log(low), math.log(high), 40_000)):
            sketch.add(float(v))
        sizes.append(len(sketch.counts))
    assert sketch.count == 200_000
    assert sizes[-1] <= bound and sizes[-1] - sizes[1] <= 2  # full after the first 80k values; no growth after
    tiny = LogSketch(max_buckets=64)  # past max_buckets the lowest buckets collapse: the tail stays exact
    values = np.exp(rng.uniform(math.log(low), math.log(high), 5_000))
    for v in values:
        tiny.add(float(v))
    assert len(tiny.counts) == 64
    exact = np.quantile(values, 0.99, method="lower")
    assert abs(tiny.quantile(0.99) - exact) <= DEFAULT_RELATIVE_ERROR * exact


def test_zero_and_tiny_values_share_the_lowest_bucket_and_bad_settings_are_refused():
    sketch = sketch_of([0.0, MIN_VALUE / 10, MIN_VALUE])
    assert len(sketch.counts) == 1 and sketch.quantile(0.5) == pytest.approx(MIN_VALUE, rel=0.01)
    with pytest.raises(ValueError):
        LogSketch(relative_error=1.5)
    with pytest.raises(ValueError):
        LogSketch().quantile(0.5)


def test_time_windows_are_bounded_by_doubling_their_width():
    from deepseek.ops.logs.groups import MAX_WINDOWS, GroupStats

    stats = GroupStats(window_s=1.0)
    for t in range(3 * MAX_WINDOWS):  # one line a second: 3x more one-second windows than are kept
        stats.add({"queue_ms": 1.0}, float(t), 5.0, t % 100 == 0)
    assert len(stats.windows) <= MAX_WINDOWS and stats.window_s == 4.0
    series = stats.series()
    assert sum(r["requests"] for r in series) == 3 * MAX_WINDOWS and series[0]["requests"] == 4
    assert sum(r["error_rate"] * r["requests"] for r in series) == pytest.approx(stats.errors)
