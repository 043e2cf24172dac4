"""Version routing: which ready version of a model serves a request that names none.

    router = Router()
    router.set_policy("gpt", parse_policy({"policy": "weighted", "weights": {"1": 95, "2": 5}}))
    route = router.route("gpt", available=[1, 2], key=request.headers.get("x-user-id"))
    route.version, route.variant, route.policy        # 2, None, "weighted"

    ab = ABTest(control_ratio=0.7, metrics=["click"])  # control = 2nd-highest ready version, treatment = highest
    router.set_policy("gpt", ab)
    router.route("gpt", [1, 2], key="alice")           # Route(version=..., variant="control"|"treatment", policy="ab")
    ab.record_outcome("alice", "click")                # later, when alice clicked
    ab.report()                                        # rates with Wilson 95% intervals, two-proportion z-test

Policies: ``latest`` (the default: highest ready version), ``pinned`` (one version, or
:class:`VersionUnavailable`), ``weighted`` (canary split) and ``ab`` (an experiment with outcome metrics).
A routing key (e.g. a user id) makes ``weighted`` and ``ab`` sticky: the same key lands on the same version
for as long as the policy and the ready versions are unchanged, because the choice is a hash of the key,
not state. Without a key the choice is a seeded random draw.

Bad configuration raises :class:`deepseek.config.ConfigError`. ``describe()`` gives JSON that
:func:`parse_policy` accepts back. Counters are guarded by a lock: the HTTP and gRPC front ends call from
different threads. Pure logic, no HTTP; the server wires it in.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from deepseek.config import ConfigError

POLICIES = ("latest", "pinned", "weighted", "ab")
VARIANTS = ("control", "treatment")
Z95 = 1.959963984540054  # two-sided 95% normal quantile
_VERSION_NAME = re.compile(r"[1-9][0-9]*")  # a version written as a string, as JSON object keys are


class VersionUnavailable(LookupError):
    """The version a policy must serve is not ready (HTTP 503 / gRPC UNAVAILABLE)."""


@dataclass(frozen=True)
class Route:
    """A routing decision: the version to serve, the experiment variant (``ab`` only) and the policy kind."""

    version: int
    variant: Optional[str]
    policy: str


def _unit(text: str) -> float:
    """A uniform float in [0, 1) from a stable hash of ``text`` (same on every process and restart)."""
    h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
    return (h >> 11) * 2.0 ** -53  # top 53 bits: exactly representable, so never rounds up to 1.0


def _check_available(available: Sequence[int]) -> None:
    if not available:
        raise VersionUnavailable("no version of the model is ready")


# --- validation (shared by the constructors and parse_policy) ---

def _version(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where} must be a positive integer version, got {value!r}")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    return value


def _seed(value: Any, where: str) -> Optional[int]:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where} must be an integer or null, got {value!r}")
    return value


class RoutingPolicy(ABC):
    """Chooses one of the ready versions for a request. ``kind`` is the name :func:`parse_policy` knows it by."""

    kind: str

    @abstractmethod
    def choose(self, available: Sequence[int], key: Optional[str]) -> Route:
        """Pick a version from ``available`` (ready versions, ascending, non-empty); ``key`` is the request's
        routing key or None. Raises :class:`VersionUnavailable` when the policy cannot serve any of them."""

    @abstractmethod
    def describe(self) -> dict:
        """JSON-able description that :func:`parse_policy` turns back into an equal policy."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


class LatestPolicy(RoutingPolicy):
    """The highest ready version: the default, so a new version takes traffic as soon as it is ready."""

    kind = "latest"

    def choose(self, available: Sequence[int], key: Optional[str]) -> Route:
        _check_available(available)
        return Route(max(available), None, self.kind)

    def describe(self) -> dict:
        return {"policy": self.kind}


class PinnedPolicy(RoutingPolicy):
    """Always ``version``; :class:`VersionUnavailable` while it is not ready (no silent fallback)."""

    kind = "pinned"

    def __init__(self, version: int):
        self.version = _version(version, "pinned policy: version")

    def choose(self, available: Sequence[int], key: Optional[str]) -> Route:
        if self.version not in available:
            raise VersionUnavailable(f"pinned version {self.version} is not ready (ready: {list(available)})")
        return Route(self.version, None, self.kind)

    def describe(self) -> dict:
        return {"policy": self.kind, "version": self.version}


class WeightedPolicy(RoutingPolicy):
    """Split traffic by weight, e.g. a canary ``{1: 95, 2: 5}`` (weights need not sum to 1 or 100).

    Weighted versions that are not ready are skipped and the others renormalised; when none of them is
    ready the highest ready version serves (a canary config must not take a model down). With a key the
    choice is sticky: the key hashes to u in [0, 1) and walks the cumulative weights in ascending version
    order, so it stays put while the weights and ready versions stay put. ``counts`` is requests per version.
    """

    kind = "weighted"

    def __init__(self, weights: Mapping[int, float], seed: Optional[int] = None):
        if not isinstance(weights, Mapping) or not weights:
            raise ConfigError(f"weighted policy: weights must be a non-empty mapping of version to weight, "
                              f"got {weights!r}")
        checked = {}
        for v, w in weights.items():
            v = _version(v, "weighted policy: weights key")
            w = _number(w, f"weighted policy: weights[{v}]")
            if w < 0:
                raise ConfigError(f"weighted policy: weights[{v}] must be >= 0, got {w!r}")
            checked[v] = w
        if not any(w > 0 for w in checked.values()):
            raise ConfigError(f"weighted policy: at least one weight must be > 0, got {checked}")
        self.weights = dict(sorted(checked.items()))
        self.seed = _seed(seed, "weighted policy: seed")
        # Zero weights never route; a tuple keeps the per-request walk allocation-free.
        self._positive = tuple((v, w) for v, w in self.weights.items() if w > 0)
        self._rng = random.Random(seed)
        self._counts: dict[int, int] = {}
        self._lock = threading.Lock()

    @property
    def counts(self) -> dict[int, int]:
        """Requests routed per version so far (a copy)."""
        with self._lock:
            return dict(self._counts)

    def choose(self, available: Sequence[int], key: Optional[str]) -> Route:
        _check_available(available)
        total = sum(w for v, w in self._positive if v in available)
        if total == 0:
            version = max(available)
        else:
            if key is None:
                with self._lock:
                    u = self._rng.random()
            else:
                u = _unit(key)
            target = u * total
            for v, w in self._positive:
                if v in available:
                    version = v  # float rounding can leave target at ~0 past the end: the last ready one is right
                    target -= w
                    if target < 0:
                        break
        with self._lock:
            self._counts[version] = self._counts.get(version, 0) + 1
        return Route(version, None, self.kind)

    def describe(self) -> dict:
        d = {"policy": self.kind, "weights": {str(v): w for v, w in self.weights.items()}}
        if self.seed is not None:
            d["seed"] = self.seed
        return d


def wilson_interval(successes: int, n: int, z: float = Z95) -> Optional[tuple[float, float]]:
    """Wilson score interval for a binomial proportion (sound near 0 and 1, unlike p ± z·se); None for n=0."""
    if n == 0:
        return None
    p = successes / n
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # At 0 or n successes the bound is exactly 0 or 1; the formula can miss it by an ulp.
    return (0.0 if successes == 0 else center - half), (1.0 if successes == n else center + half)


def two_proportion_p_value(x1: int, n1: int, x2: int, n2: int) -> Optional[float]:
    """Two-sided p-value of the pooled two-proportion z-test of x1/n1 vs x2/n2; None when undefined
    (an empty group, or a pooled rate of 0 or 1, where the standard error is 0)."""
    if n1 == 0 or n2 == 0:
        return None
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return None
    z = (x2 / n2 - x1 / n1) / se
    return math.erfc(abs(z) / math.sqrt(2))


class ABTest(RoutingPolicy):
    """An A/B experiment between two versions, with per-variant outcome metrics.

    ``control``/``treatment`` are versions; None means control = the second-highest ready version (the
    only one when one is ready) and treatment = the highest. A key is assigned by hashing
    ``name + ":" + key``: "control" when the hash falls below ``control_ratio``, else "treatment" — so
    renaming the experiment reshuffles users, and changing versions does not. Keyless requests draw at
    random and count as anonymous exposures. If the assigned variant's version is not ready the request
    is served by the other variant; the returned Route names the variant actually served.

    Analysis is by assignment (intent to treat): exposures (distinct keys, plus anonymous requests) and
    outcomes count under the assigned variant; ``requests`` counts what was served and ``fallbacks`` the
    requests served by the other variant. Rates divide by keyed exposures only, since anonymous requests
    can never record an outcome. Memory grows with the number of distinct keys (a set per variant and per
    variant and metric); start a new experiment (a new policy object) to reset it.
    """

    kind = "ab"

    def __init__(self, control_ratio: float = 0.5, metrics: Sequence[str] = ("conversion",),
                 control: Optional[int] = None, treatment: Optional[int] = None,
                 name: str = "experiment", seed: Optional[int] = None):
        ratio = _number(control_ratio, "ab policy: control_ratio")
        if not 0 <= ratio <= 1:
            raise ConfigError(f"ab policy: control_ratio must be in [0, 1], got {control_ratio!r}")
        if (isinstance(metrics, str) or not isinstance(metrics, Sequence) or not metrics
                or not all(isinstance(m, str) and m for m in metrics)):
            raise ConfigError(f"ab policy: metrics must be a non-empty list of metric names, got {metrics!r}")
        if len(set(metrics)) != len(metrics):
            raise ConfigError(f"ab policy: metrics has duplicates: {list(metrics)}")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"ab policy: name must be a non-empty string, got {name!r}")
        self.control_ratio = ratio
        self.metrics = tuple(metrics)
        self.control = None if control is None else _version(control, "ab policy: control")
        self.treatment = None if treatment is None else _version(treatment, "ab policy: treatment")
        self.name = name
        self.seed = _seed(seed, "ab policy: seed")
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._served_version = {"control": self.control, "treatment": self.treatment}
        self._requests = dict.fromkeys(VARIANTS, 0)
        self._fallbacks = dict.fromkeys(VARIANTS, 0)
        self._anonymous = dict.fromkeys(VARIANTS, 0)
        self._keys: dict[str, set[str]] = {v: set() for v in VARIANTS}
        self._converted = {v: {m: set() for m in self.metrics} for v in VARIANTS}
        self._value_sum = {v: dict.fromkeys(self.metrics, 0.0) for v in VARIANTS}

    def assign(self, key: str) -> str:
        """The variant ``key`` is assigned to (pure: counts nothing)."""
        return "control" if _unit(f"{self.name}:{key}") < self.control_ratio else "treatment"

    def _versions(self, available: Sequence[int]) -> dict[str, int]:
        top = available[-1]
        below = available[-2] if len(available) > 1 else top
        return {"control": below if self.control is None else self.control,
                "treatment": top if self.treatment is None else self.treatment}

    def choose(self, available: Sequence[int], key: Optional[str]) -> Route:
        _check_available(available)
        versions = self._versions(available)
        if key is not None:
            assigned = self.assign(key)
        else:
            with self._lock:
                assigned = "control" if self._rng.random() < self.control_ratio else "treatment"
        served = assigned
        if versions[assigned] not in available:
            served = "treatment" if assigned == "control" else "control"
            if versions[served] not in available:
                raise VersionUnavailable(f"experiment {self.name!r}: neither control version {versions['control']} "
                                         f"nor treatment version {versions['treatment']} is ready "
                                         f"(ready: {list(available)})")
        with self._lock:
            self._requests[served] += 1
            self._served_version[served] = versions[served]
            if served != assigned:
                self._fallbacks[assigned] += 1
            if key is None:
                self._anonymous[assigned] += 1
            else:
                self._keys[assigned].add(key)
        return Route(versions[served], served, self.kind)

    def record_outcome(self, key: str, metric: str, value: float = 1.0) -> str:
        """Record that ``key`` reached ``metric`` (a key converts at most once per metric; ``value`` is
        summed every time). Returns the key's variant. LookupError for a key this experiment never routed."""
        if metric not in self.metrics:
            raise ConfigError(f"experiment {self.name!r}: unknown metric {metric!r} "
                              f"(valid: {', '.join(self.metrics)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"experiment {self.name!r}: outcome value must be a finite number, got {value!r}")
        variant = self.assign(key)
        with self._lock:
            if key not in self._keys[variant]:
                raise LookupError(f"experiment {self.name!r}: key {key!r} was never routed by this experiment; "
                                  f"only exposed keys can record outcomes")
            self._converted[variant][metric].add(key)
            self._value_sum[variant][metric] += value
        return variant

    def report(self) -> dict:
        """Per-variant requests, exposures and metric rates with Wilson 95% intervals, and the
        treatment − control difference with a two-sided two-proportion z-test p-value per metric.

        ``version`` is the configured version or, when it follows the ready versions, the one last served
        (None before any request)."""
        with self._lock:
            n = {v: len(self._keys[v]) for v in VARIANTS}
            x = {v: {m: len(self._converted[v][m]) for m in self.metrics} for v in VARIANTS}
            variants = {}
            for v in VARIANTS:
                metrics = {}
                for m in self.metrics:
                    ci = wilson_interval(x[v][m], n[v])
                    metrics[m] = {"conversions": x[v][m], "rate": x[v][m] / n[v] if n[v] else None,
                                  "ci95": None if ci is None else list(ci), "value_sum": self._value_sum[v][m]}
                variants[v] = {"version": self._served_version[v], "requests": self._requests[v],
                               "exposures": n[v] + self._anonymous[v], "anonymous": self._anonymous[v],
                               "fallbacks": self._fallbacks[v], "metrics": metrics}
        comparison = {}
        for m in self.metrics:
            rc, rt = variants["control"]["metrics"][m]["rate"], variants["treatment"]["metrics"][m]["rate"]
            comparison[m] = {"difference": None if rc is None or rt is None else rt - rc,
                             "p_value": two_proportion_p_value(x["control"][m], n["control"],
                                                               x["treatment"][m], n["treatment"])}
        return {"name": self.name, "control_ratio": self.control_ratio, "metrics": list(self.metrics),
                "variants": variants, "comparison": comparison}

    def describe(self) -> dict:
        d = {"policy": self.kind, "name": self.name, "control_ratio": self.control_ratio,
             "metrics": list(self.metrics), "control": self.control, "treatment": self.treatment}
        if self.seed is not None:
            d["seed"] = self.seed
        return d


# Keys each policy accepts in parse_policy, besides "policy"; the first group is required.
_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "latest": ((), ()),
    "pinned": (("version",), ()),
    "weighted": (("weights",), ("seed",)),
    "ab": ((), ("control_ratio", "metrics", "control", "treatment", "name", "seed")),
}


def parse_policy(data: Mapping) -> RoutingPolicy:
    """A policy from config or management JSON: ``{"policy": "latest"}``, ``{"policy": "pinned", "version": 2}``,
    ``{"policy": "weighted", "weights": {"1": 95, "2": 5}}`` or ``{"policy": "ab", "control_ratio": 0.7,
    "metrics": ["click"], "control": 1, "treatment": 2, "name": "exp1"}``. ConfigError on anything else."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"routing policy must be a mapping with a 'policy' key, got {data!r}")
    kind = data.get("policy")
    if not isinstance(kind, str) or kind not in _KEYS:  # a JSON list/object is unhashable: a ConfigError, not a crash
        what = "missing 'policy'" if kind is None else f"unknown routing policy {kind!r}"
        raise ConfigError(f"{what} (valid: {', '.join(POLICIES)})")
    required, optional = _KEYS[kind]
    valid = ("policy",) + required + optional
    unknown = [k for k in data if k not in valid]
    if unknown:
        raise ConfigError(f"{kind} policy: unknown key {unknown[0]!r} (valid: {', '.join(valid)})")
    missing = [k for k in required if k not in data]
    if missing:
        raise ConfigError(f"{kind} policy: missing required key {missing[0]!r}")
    args = {k: v for k, v in data.items() if k != "policy"}
    if kind == "latest":
        return LatestPolicy()
    if kind == "pinned":
        return PinnedPolicy(**args)
    if kind == "weighted":
        weights = args["weights"]
        if not isinstance(weights, Mapping):
            raise ConfigError(f"weighted policy: weights must be a mapping of version to weight, got {weights!r}")
        # JSON object keys are strings: accept canonical version strings ("2", not "02" or "x").
        args["weights"] = {int(v) if isinstance(v, str) and _VERSION_NAME.fullmatch(v) else v: w
                           for v, w in weights.items()}
        return WeightedPolicy(**args)
    return ABTest(**args)


_DEFAULT = LatestPolicy()  # stateless, so one instance serves every model


class Router:
    """Per-model routing state the server holds: one policy per model name, default :class:`LatestPolicy`."""

    def __init__(self):
        self._policies: dict[str, RoutingPolicy] = {}
        self._lock = threading.Lock()

    def set_policy(self, model: str, policy: RoutingPolicy) -> None:
        """Route ``model`` by ``policy`` from now on (replacing its counters, if it had a policy)."""
        if not isinstance(policy, RoutingPolicy):
            raise TypeError(f"policy must be a RoutingPolicy, got {type(policy).__name__}")
        with self._lock:
            self._policies[model] = policy

    def clear(self, model: str) -> None:
        """Back to the default (latest) for ``model``; a no-op when it has no policy set."""
        with self._lock:
            self._policies.pop(model, None)

    def policy(self, model: str) -> RoutingPolicy:
        """The policy routing ``model``: the one set, else the default LatestPolicy."""
        with self._lock:
            return self._policies.get(model, _DEFAULT)

    def route(self, model: str, available: Sequence[int], key: Optional[str]) -> Route:
        """Choose a version of ``model`` among ``available`` (ready, ascending) for a request with ``key``."""
        return self.policy(model).choose(available, key)

    def describe(self) -> dict[str, dict]:
        """``{model: policy.describe()}`` for models with a policy set (the rest route to the latest)."""
        with self._lock:
            policies = dict(self._policies)
        return {model: p.describe() for model, p in sorted(policies.items())}
