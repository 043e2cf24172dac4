"""Version routing: policies pick the versions they promise, sticky keys stay put, A/B statistics are right."""

import json
import math
import threading

import pytest

from deepseek.config import ConfigError
from deepseek.serve.routing import (ABTest, LatestPolicy, PinnedPolicy, Route, Router, VersionUnavailable,
                                    WeightedPolicy, parse_policy, two_proportion_p_value, wilson_interval)


def within(observed: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    """observed/n is within ``sigmas`` binomial standard deviations of p (false alarm ~1e-5 per check)."""
    return abs(observed / n - p) < sigmas * math.sqrt(p * (1 - p) / n)


def test_latest_picks_highest_ready():
    assert LatestPolicy().choose([1, 3, 7], None) == Route(7, None, "latest")
    with pytest.raises(VersionUnavailable):
        LatestPolicy().choose([], None)


def test_pinned_serves_its_version_or_raises():
    assert PinnedPolicy(2).choose([1, 2, 3], "k") == Route(2, None, "pinned")
    with pytest.raises(VersionUnavailable, match=r"pinned version 4 is not ready \(ready: \[1, 2, 3\]\)"):
        PinnedPolicy(4).choose([1, 2, 3], None)


def test_weighted_keyless_split_matches_weights():
    n = 20_000
    policy = WeightedPolicy({1: 95, 2: 5}, seed=0)
    versions = [policy.choose([1, 2], None).version for _ in range(n)]
    assert set(versions) == {1, 2}
    assert within(versions.count(2), n, 0.05)
    assert policy.counts == {1: versions.count(1), 2: versions.count(2)}
    # The seed makes the draw reproducible.
    again = WeightedPolicy({1: 95, 2: 5}, seed=0)
    assert [again.choose([1, 2], None).version for _ in range(n)] == versions


def test_weighted_keys_are_sticky_and_split_near_weights():
    policy = WeightedPolicy({1: 95, 2: 5})
    keys = [f"user-{i}" for i in range(20_000)]
    first = {k: policy.choose([1, 2], k).version for k in keys}
    assert all(policy.choose([1, 2], k).version == first[k] for k in keys[:2000])
    assert within(sum(v == 2 for v in first.values()), len(keys), 0.05)
    # A fresh policy with the same weights (e.g. after a restart) routes every key the same way.
    fresh = WeightedPolicy({2: 5, 1: 95})
    assert all(fresh.choose([1, 2], k).version == first[k] for k in keys[:2000])


def test_weighted_skips_unready_versions_and_renormalises():
    policy = WeightedPolicy({1: 50, 2: 25, 3: 25}, seed=1)
    n = 6000
    versions = [policy.choose([1, 2], None).version for _ in range(n)]
    assert set(versions) == {1, 2}
    assert within(versions.count(2), n, 1 / 3)
    assert {policy.choose([2], f"k{i}").version for i in range(100)} == {2}
    # None of the weighted versions ready: the highest ready version serves rather than failing.
    assert WeightedPolicy({3: 1}).choose([1, 2], "k") == Route(2, None, "weighted")
    # A zero weight never routes.
    assert {WeightedPolicy({1: 0, 2: 1}).choose([1, 2], f"k{i}").version for i in range(200)} == {2}


def test_ab_defaults_to_second_highest_vs_highest_and_is_sticky():
    ab = ABTest(control_ratio=0.7, metrics=["click"])
    keys = [f"user-{i}" for i in range(20_000)]
    routes = {k: ab.choose([1, 2, 3], k) for k in keys}
    assert {(r.version, r.variant) for r in routes.values()} == {(2, "control"), (3, "treatment")}
    assert all(r.policy == "ab" for r in routes.values())
    assert all(ab.choose([1, 2, 3], k) == routes[k] for k in keys[:2000])
    assert all(ab.assign(k) == routes[k].variant for k in keys)
    assert within(sum(r.variant == "control" for r in routes.values()), len(keys), 0.7)
    # One ready version: both variants serve it.
    assert ABTest().choose([5], "k").version == 5


def test_ab_explicit_versions_and_fallback_reports_served_variant():
    ab = ABTest(control=1, treatment=3, name="exp1")
    keys = [f"u{i}" for i in range(200)]
    assert {ab.choose([1, 2, 3], k).version for k in keys} == {1, 3}
    # Treatment's version is down: everyone gets control, and the Route says so.
    control_before = ab.report()["variants"]["control"]["requests"]
    assert {ab.choose([1, 2], k) for k in keys} == {Route(1, "control", "ab")}
    report = ab.report()["variants"]
    treated = sum(ab.assign(k) == "treatment" for k in keys)
    assert report["treatment"]["fallbacks"] == treated
    assert report["control"]["requests"] == control_before + len(keys)
    with pytest.raises(VersionUnavailable, match="neither control version 1 nor treatment version 3"):
        ab.choose([2], "u0")


def test_ab_exposures_count_distinct_keys_and_anonymous_requests():
    ab = ABTest(seed=0)
    key = "alice"
    for _ in range(5):
        variant = ab.choose([1, 2], key).variant
    anonymous = [ab.choose([1, 2], None).variant for _ in range(10)]
    report = ab.report()["variants"]
    assert report[variant]["requests"] == 5 + anonymous.count(variant)
    assert report[variant]["exposures"] == 1 + anonymous.count(variant)
    assert sum(report[v]["anonymous"] for v in ("control", "treatment")) == 10
    assert report[variant]["version"] == (1 if variant == "control" else 2)


def test_record_outcome():
    ab = ABTest(metrics=["click", "buy"], name="exp")
    variant = ab.choose([1, 2], "bob").variant
    assert ab.record_outcome("bob", "click") == variant
    assert ab.record_outcome("bob", "click", 2.5) == variant
    assert ab.record_outcome("bob", "buy", 10.0) == variant
    metrics = ab.report()["variants"][variant]["metrics"]
    assert metrics["click"]["conversions"] == 1  # a key converts once per metric ...
    assert metrics["click"]["value_sum"] == 3.5  # ... but every value counts
    assert metrics["click"]["rate"] == 1.0 and metrics["buy"]["value_sum"] == 10.0
    other = "treatment" if variant == "control" else "control"
    assert ab.report()["variants"][other]["metrics"]["click"]["conversions"] == 0
    with pytest.raises(LookupError, match="'carol' was never routed"):
        ab.record_outcome("carol", "click")
    with pytest.raises(ConfigError, match=r"unknown metric 'view' \(valid: click, buy\)"):
        ab.record_outcome("bob", "view")
    with pytest.raises(ValueError, match="finite number"):
        ab.record_outcome("bob", "click", float("inf"))


def test_report_rates_wilson_interval_and_p_value():
    ab = ABTest(metrics=["click"], name="exp")
    by_variant = {"control": [], "treatment": []}
    i = 0
    while min(len(v) for v in by_variant.values()) < 200:
        key = f"user-{i}"
        i += 1
        if len(by_variant[ab.assign(key)]) < 200:
            by_variant[ab.assign(key)].append(key)
    for key in by_variant["control"] + by_variant["treatment"]:
        ab.choose([1, 2], key)
    for key in by_variant["control"][:50]:
        ab.record_outcome(key, "click")
    for key in by_variant["treatment"][:70]:
        ab.record_outcome(key, "click")

    report = ab.report()
    control = report["variants"]["control"]
    assert control["exposures"] == 200 and control["version"] == 1
    click = control["metrics"]["click"]
    assert click["conversions"] == 50 and click["rate"] == 0.25
    # Wilson 95% for 50/200 by hand: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n).
    z, n, p = 1.959963984540054, 200, 0.25
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert click["ci95"] == pytest.approx([center - half, center + half])
    assert click["ci95"] == pytest.approx([0.19508, 0.31434], abs=1e-5)  # scipy binomtest(...).proportion_ci("wilson")
    comparison = report["comparison"]["click"]
    assert comparison["difference"] == pytest.approx(0.35 - 0.25)
    assert comparison["p_value"] == pytest.approx(two_proportion_p_value(50, 200, 70, 200))
    assert json.loads(json.dumps(report)) == report


def test_statistics_helpers():
    # 200/1000 vs 250/1000: z = 2.677, two-sided p = 0.0074196 (chi-square test without continuity correction).
    assert two_proportion_p_value(200, 1000, 250, 1000) == pytest.approx(0.0074196, abs=1e-6)
    assert two_proportion_p_value(0, 10, 0, 10) is None  # pooled rate 0: no variance, no test
    assert two_proportion_p_value(1, 10, 1, 0) is None
    assert wilson_interval(0, 0) is None
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.27753, abs=1e-5)
    assert wilson_interval(10, 10)[1] == 1.0


def test_empty_report_is_undefined_not_zero():
    report = ABTest(metrics=["click"]).report()
    click = report["variants"]["treatment"]["metrics"]["click"]
    assert click["rate"] is None and click["ci95"] is None
    assert report["comparison"]["click"] == {"difference": None, "p_value": None}


@pytest.mark.parametrize("policy", [
    LatestPolicy(), PinnedPolicy(3), WeightedPolicy({1: 95, 2: 5.5}), WeightedPolicy({1: 1, 2: 0}, seed=7),
    ABTest(), ABTest(control_ratio=0.7, metrics=["click", "buy"], control=1, treatment=2, name="exp1", seed=3),
])
def test_describe_round_trips_through_json(policy):
    data = json.loads(json.dumps(policy.describe()))
    again = parse_policy(data)
    assert type(again) is type(policy) and again.describe() == policy.describe()


def test_parse_policy_accepts_int_and_str_weight_keys():
    assert parse_policy({"policy": "weighted", "weights": {1: 95, "2": 5}}).weights == {1: 95, 2: 5}
    ab = parse_policy({"policy": "ab", "control_ratio": 0.7, "metrics": ["click"]})
    assert (ab.control_ratio, ab.metrics, ab.control, ab.treatment) == (0.7, ("click",), None, None)


@pytest.mark.parametrize("data, message", [
    ({"policy": "random"}, "unknown routing policy 'random' (valid: latest, pinned, weighted, ab)"),
    ({}, "missing 'policy'"),
    ("latest", "must be a mapping"),
    ({"policy": "latest", "version": 1}, "latest policy: unknown key 'version' (valid: policy)"),
    ({"policy": "pinned"}, "missing required key 'version'"),
    ({"policy": "pinned", "version": "2"}, "pinned policy: version must be a positive integer"),
    ({"policy": "pinned", "version": 0}, "positive integer"),
    ({"policy": "pinned", "version": True}, "positive integer"),
    ({"policy": "weighted", "weights": {"1": 95}, "seeds": 1}, "unknown key 'seeds' (valid: policy, weights, seed)"),
    ({"policy": "weighted", "weights": {}}, "weights must be a non-empty mapping"),
    ({"policy": "weighted", "weights": [95, 5]}, "weights must be a mapping"),
    ({"policy": "weighted", "weights": {"01": 1}}, "weights key must be a positive integer"),
    ({"policy": "weighted", "weights": {"a": 1}}, "weights key must be a positive integer"),
    ({"policy": "weighted", "weights": {"1": -1, "2": 5}}, "weights[1] must be >= 0"),
    ({"policy": "weighted", "weights": {"1": "95"}}, "weights[1] must be a finite number"),
    ({"policy": "weighted", "weights": {"1": float("nan")}}, "weights[1] must be a finite number"),
    ({"policy": "weighted", "weights": {"1": 0, "2": 0}}, "at least one weight must be > 0"),
    ({"policy": "weighted", "weights": {"1": 1}, "seed": 1.5}, "seed must be an integer"),
    ({"policy": "ab", "ratio": 0.5}, "ab policy: unknown key 'ratio' (valid: policy, control_ratio, metrics, control"),
    ({"policy": "ab", "control_ratio": 1.5}, "control_ratio must be in [0, 1]"),
    ({"policy": "ab", "control_ratio": "half"}, "control_ratio must be a finite number"),
    ({"policy": "ab", "metrics": "click"}, "metrics must be a non-empty list"),
    ({"policy": "ab", "metrics": []}, "metrics must be a non-empty list"),
    ({"policy": "ab", "metrics": ["a", "a"]}, "metrics has duplicates"),
    ({"policy": "ab", "control": -1}, "ab policy: control must be a positive integer"),
    ({"policy": "ab", "treatment": 2.0}, "ab policy: treatment must be a positive integer"),
    ({"policy": "ab", "name": ""}, "name must be a non-empty string"),
])
def test_bad_configs_say_what_is_wrong(data, message):
    with pytest.raises(ConfigError) as info:
        parse_policy(data)
    assert message in str(info.value)


def test_router_holds_one_policy_per_model():
    router = Router()
    assert isinstance(router.policy("gpt"), LatestPolicy)
    assert router.route("gpt", [1, 2], None) == Route(2, None, "latest")
    router.set_policy("gpt", PinnedPolicy(1))
    assert router.route("gpt", [1, 2], "k") == Route(1, None, "pinned")
    assert router.route("bert", [1, 2], "k") == Route(2, None, "latest")
    router.set_policy("bert", parse_policy({"policy": "weighted", "weights": {"1": 1}}))
    assert router.describe() == {"bert": {"policy": "weighted", "weights": {"1": 1}},
                                 "gpt": {"policy": "pinned", "version": 1}}
    router.clear("gpt")
    router.clear("never-set")
    assert router.route("gpt", [1, 2], None).version == 2
    assert list(router.describe()) == ["bert"]
    with pytest.raises(TypeError):
        router.set_policy("gpt", {"policy": "latest"})


def test_counters_are_exact_under_concurrent_routing():
    weighted, ab = WeightedPolicy({1: 1, 2: 1}, seed=0), ABTest(seed=0)
    threads, per_thread = 8, 2000

    def work(t):
        for i in range(per_thread):
            weighted.choose([1, 2], None if i % 2 else f"{t}-{i}")
            ab.choose([1, 2], None if i % 2 else f"{t}-{i}")

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert sum(weighted.counts.values()) == threads * per_thread
    variants = ab.report()["variants"].values()
    assert sum(v["requests"] for v in variants) == threads * per_thread
    assert sum(v["exposures"] for v in variants) == threads * per_thread  # every key distinct, anonymous count 1
