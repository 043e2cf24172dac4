"""The model manager: loaded model versions, their READY/UNAVAILABLE state, and the way requests reach them.

    manager = ModelManager(ModelRepository("models/"), control_mode="poll")
    await manager.load_all()                      # every selected version of every healthy model
    outputs = await manager.infer("digits", None, {"x": x})   # None: the routing policy picks (default latest)
    await manager.close()                         # drain the queues, close the backends

Every READY version has a :class:`~deepseek.serve.batching.DynamicBatcher`: a model with ``max_batch_size > 0``
and a ``dynamic_batching`` section batches requests together; any other model runs each request alone
through the same bounded queue, so queue limits, deadlines, priorities and statistics work the same for
all. Either way the event loop never runs the model.

Nothing here raises for a broken model: a config error from the repository scan, or a backend that fails
to load, leaves the version UNAVAILABLE with the reason (shown by :meth:`ModelManager.index`). A reload
(:meth:`load` of a model already served) loads the new versions first and then swaps them in, so traffic is
not interrupted; a version whose reload fails keeps serving the old copy. Replaced versions are drained.

Model control follows Triton: ``none`` loads everything at start and refuses load/unload requests,
``explicit`` loads only ``startup_models`` (``"*"`` = all) and takes load/unload requests, ``poll`` loads
everything and follows the repository (:meth:`poll` / :meth:`poll_forever`) while refusing requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch

from deepseek.config import ConfigError
from deepseek.serve.backends import Backend, load_backend
from deepseek.serve.batching import (BatcherClosedError, BatchRecord, DeadlineExceededError, DynamicBatcher,
                                     QueueFullError, RequestTrace)
from deepseek.serve.config import ServingConfig
from deepseek.serve.errors import ControlModeError, ModelLoadError, ModelNotFoundError, ModelUnavailableError
from deepseek.serve.repository import ModelRepository, RepositoryWatcher
from deepseek.serve.routing import Route, Router, parse_policy
from deepseek.serve.stats import ModelStats

log = logging.getLogger(__name__)

READY, UNAVAILABLE = "READY", "UNAVAILABLE"
CONTROL_MODES = ("none", "poll", "explicit")


@dataclass(eq=False)
class ModelVersion:
    """One (model, version) the manager knows of; ``backend`` and ``batcher`` are set only while READY."""

    name: str
    version: Optional[int]  # None: a broken model with no version folders
    state: str = UNAVAILABLE
    reason: str = ""
    backend: Optional[Backend] = None
    batcher: Optional[DynamicBatcher] = None
    config: Optional[ServingConfig] = None
    config_hash: Optional[str] = None
    stats: ModelStats = field(default_factory=ModelStats)

    @property
    def ready(self) -> bool:
        return self.state == READY and self.failure is None

    @property
    def failure(self) -> Optional[str]:
        """Why a loaded version stopped being able to serve (see :meth:`Backend.failure`), else None."""
        return None if self.backend is None else self.backend.failure()

    async def shutdown(self, reason: str) -> None:
        """Stop taking requests, drain what is queued or running, then close the backend."""
        self.state, self.reason = UNAVAILABLE, reason
        if self.batcher is not None:
            await self.batcher.stop(drain=True)
        if self.backend is not None:
            try:  # closing may drain a generation engine: off the event loop
                await asyncio.to_thread(self.backend.close)
            except Exception as exc:  # a backend failing to close must not stop the others
                log.warning("closing %s version %s failed: %s", self.name, self.version, exc)
        self.backend, self.batcher = None, None


def outcome_of(exc: BaseException) -> str:
    """The ``outcome`` label of a failed request (see :mod:`deepseek.serve.metrics`)."""
    if isinstance(exc, QueueFullError):
        return "rejected"
    if isinstance(exc, DeadlineExceededError):
        return "timeout"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    if isinstance(exc, (BatcherClosedError, ModelUnavailableError)):
        return "unavailable"
    if isinstance(exc, (ValueError, ModelNotFoundError)):
        return "invalid"
    return "error"


class ModelManager:
    """Loads the repository's models and routes inference to them (see module docs)."""

    def __init__(self, repository: ModelRepository, *, control_mode: str = "none",
                 startup_models: Optional[Sequence[str]] = None, metrics: Any = None):
        if control_mode not in CONTROL_MODES:
            raise ConfigError(f"model control mode {control_mode!r} is not one of {', '.join(CONTROL_MODES)}")
        self.repository = repository
        self.control_mode = control_mode
        self.startup_models = list(startup_models) if startup_models is not None else ["*"]
        self.metrics = metrics  # a ServingMetrics, or None
        self.router = Router()
        self._models: dict[str, dict[Optional[int], ModelVersion]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._watcher = RepositoryWatcher(repository)
        self.loaded = False  # load_all() has run
        self.closing = False

    # -- lifecycle ------------------------------------------------------------------------------------

    async def load_all(self) -> None:
        """Load the models the control mode starts with; broken ones end up UNAVAILABLE with the reason."""
        await asyncio.to_thread(self._watcher.poll)  # the scan, and the baseline for later polls
        names = list(self._watcher.entries) if "*" in self.startup_models or self.control_mode != "explicit" \
            else [n for n in self.startup_models if n]
        for name in names:
            if name not in self._watcher.entries:
                log.warning("startup model %r is not in the repository %s", name, self.repository.root)
                continue
            await self.load(name)
        self.loaded = True

    async def load(self, name: str, *, keep_loaded: bool = False) -> None:
        """(Re)load one model: its selected versions are loaded, then swapped in; replaced ones drain.

        ``keep_loaded`` reuses READY versions whose config.yaml did not change (a poll that found a new
        version folder does not reload the others). ModelNotFoundError when the folder does not exist."""
        if self.closing:
            raise ModelUnavailableError("the server is shutting down")
        try:
            self.repository.version_path(name, 1)  # validates the name
        except ValueError as exc:
            raise ModelNotFoundError(str(exc)) from None
        if not (self.repository.root / name).is_dir():
            raise ModelNotFoundError(f"model {name!r} is not in the repository {self.repository.root}")
        async with self._locks.setdefault(name, asyncio.Lock()):
            entry = await asyncio.to_thread(self.repository.scan_model, name)
            old = self._models.get(name, {})
            new: dict[Optional[int], ModelVersion] = {}
            if entry.error is not None:
                for version in entry.versions or [None]:
                    new[version] = ModelVersion(name, version, UNAVAILABLE, entry.error)
            else:
                self._apply_routing(name, entry.config)
                for version in entry.selected:
                    previous = old.get(version)
                    if keep_loaded and previous is not None and previous.ready and \
                            previous.config_hash == entry.config_hash:
                        new[version] = previous
                        continue
                    mv = await self._load_version(name, version, entry.config, entry.config_hash)
                    if not mv.ready and previous is not None and previous.ready:
                        log.warning("reload of %s version %s failed (%s); keeping the loaded one",
                                    name, version, mv.reason)
                        mv = previous
                    new[version] = mv
            self._models[name] = new  # the swap: new requests go to the new versions from here on
            # A request that selected an old version has its run() task scheduled but not yet queued; one loop
            # turn lets those reach the old queue, which then drains them, instead of hitting a stopped batcher.
            await asyncio.sleep(0)
            for version, mv in old.items():
                if new.get(version) is not mv:
                    await mv.shutdown("replaced by a reload")

    def _apply_routing(self, name: str, config: ServingConfig) -> None:
        if config.routing:
            try:
                self.router.set_policy(name, parse_policy(config.routing))
            except ConfigError as exc:
                log.warning("model %s: ignoring its routing section: %s", name, exc)

    async def _load_version(self, name: str, version: int, config: ServingConfig,
                            config_hash: Optional[str]) -> ModelVersion:
        mv = ModelVersion(name, version, config=config, config_hash=config_hash)
        try:
            path = self.repository.version_path(name, version)
            backend = await asyncio.to_thread(load_backend, name, version, path, config)
        except Exception as exc:  # BackendError and anything unexpected: the model is unavailable, not the server
            mv.reason = str(exc) or type(exc).__name__
            log.warning("model %s version %s is unavailable: %s", name, version, mv.reason)
            return mv

        def on_batch(record: BatchRecord) -> None:
            mv.stats.record_batch(record)
            if self.metrics is not None and record.ok:
                self.metrics.observe_batch(name, version, record.size)

        mv.batcher = DynamicBatcher(backend.infer, on_batch=on_batch, **backend.batcher_kwargs())
        mv.backend, mv.state = backend, READY
        return mv

    async def unload(self, name: str) -> None:
        """Stop serving a model: drain its queue, close its backends. Unknown names: ModelNotFoundError."""
        if name not in self._models:
            raise ModelNotFoundError(f"unknown model {name!r}")
        async with self._locks.setdefault(name, asyncio.Lock()):
            versions = self._models.pop(name, {})
            for mv in versions.values():
                await mv.shutdown("unloaded")

    def _check_control(self, action: str) -> None:
        if self.control_mode != "explicit":
            raise ControlModeError(f"explicit model {action} is not allowed in model-control mode "
                                   f"'{self.control_mode}' (start the server with --model-control explicit)")

    async def api_load(self, name: str) -> None:
        """A load/reload request from the repository API (explicit mode only); ModelLoadError (a ValueError:
        the client's repository is at fault) when no version of the model is READY afterwards."""
        self._check_control("load")
        await self.load(name)
        versions = self._models.get(name, {})
        if not any(mv.ready for mv in versions.values()):
            reasons = "; ".join(mv.reason for mv in versions.values() if mv.reason)
            raise ModelLoadError(f"failed to load {name!r}: {reasons or 'no version is ready'}")

    async def api_unload(self, name: str) -> None:
        """An unload request from the repository API (explicit mode only)."""
        self._check_control("unload")
        await self.unload(name)

    # -- LoRA adapters at run time (the management API) ----------------------------------------------

    def _adapter_backends(self, name: str) -> list[Any]:
        """The READY versions' backends of ``name``, which must all serve adapters (ValueError otherwise)."""
        backends = [self.versions(name)[v].backend for v in self.ready_versions(name)]
        if not backends:
            raise ModelUnavailableError(f"model {name!r} has no READY version")
        if not all(hasattr(b, "load_adapter") for b in backends):
            raise ValueError(f"model {name!r} is served by the {backends[0].platform!r} backend; LoRA adapters need "
                             f"the deepseek backend")
        return backends

    async def load_adapter(self, name: str, adapter: str, directory: str) -> list[int]:
        """Serve the adapter directory (on this machine) as ``<name>:<adapter>`` on every READY version of
        ``name``; returns the versions. Every version reads and checks it first (an AdapterError, a ValueError,
        changes nothing), then each swaps it in between two engine iterations. It lasts until the model is
        reloaded (a reload serves what its config.yaml lists)."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            backends = self._adapter_backends(name)
            read = [await asyncio.to_thread(b.read_adapter, adapter, directory) for b in backends]
            for backend, served in zip(backends, read):
                await asyncio.to_thread(backend.install_adapter, served)
            return self.ready_versions(name)

    async def unload_adapter(self, name: str, adapter: str) -> list[int]:
        """Stop serving ``<name>:<adapter>`` to new requests on every READY version that has it (its running
        requests finish with it); ModelNotFoundError when none has it. Returns the versions."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            backends = [b for b in self._adapter_backends(name) if adapter in b.adapters]
            if not backends:
                raise ModelNotFoundError(f"model {name!r} has no adapter {adapter!r}")
            for backend in backends:
                await asyncio.to_thread(backend.unload_adapter, adapter)
            return [b.version for b in backends]

    async def poll(self) -> list[str]:
        """Follow the repository once: load new models, reload changed ones, unload removed ones.

        Returns the names acted on. A model whose reload fails keeps serving what it had."""
        changes = await asyncio.to_thread(self._watcher.poll)
        entries = self._watcher.entries
        touched = sorted({n for n, _ in changes.added} | {n for n, _ in changes.removed} | set(changes.changed_config)
                         | {n for n in entries if n not in self._models})
        gone = sorted(n for n in self._models if n not in entries)
        for name in touched:
            if name in entries and not self.closing:
                await self.load(name, keep_loaded=name not in changes.changed_config)
        for name in gone:
            if not self.closing:
                await self.unload(name)
        return touched + gone

    async def poll_forever(self, interval_s: float) -> None:
        """:meth:`poll` every ``interval_s`` until cancelled; a failing poll is logged, not fatal."""
        while not self.closing:
            await asyncio.sleep(interval_s)
            try:
                changed = await self.poll()
                if changed:
                    log.info("repository poll: reloaded %s", ", ".join(changed))
            except Exception as exc:  # a half-written repository must not stop the server
                log.warning("repository poll failed: %s", exc)

    async def close(self) -> None:
        """Refuse new requests, then drain and close every loaded version."""
        self.closing = True
        for name in list(self._models):
            for mv in self._models.pop(name).values():
                await mv.shutdown("the server is shutting down")

    # -- lookups and inference ------------------------------------------------------------------------

    def model_names(self) -> list[str]:
        """The models the manager serves or tried to load (READY or not), sorted."""
        return sorted(self._models)

    def has_model(self, name: str) -> bool:
        """Whether ``name`` is one of :meth:`model_names` (routing and experiment routes need no version)."""
        return name in self._models

    def ready_versions(self, name: str) -> list[int]:
        """The READY version numbers of a model, ascending (ModelNotFoundError for an unknown one)."""
        return sorted(v for v, mv in self.versions(name).items() if v is not None and mv.ready)

    def versions(self, name: str) -> dict[Optional[int], ModelVersion]:
        """Every version of a model the manager knows, by number (ModelNotFoundError for an unknown one)."""
        if name not in self._models:
            raise ModelNotFoundError(f"unknown model {name!r}")
        return self._models[name]

    def snapshot(self) -> Iterator[tuple[str, Optional[int], ModelVersion]]:
        """Every (name, version, ModelVersion) known now (for metrics)."""
        for name, versions in list(self._models.items()):
            for version, mv in list(versions.items()):
                yield name, version, mv

    def get(self, name: str, version: Optional[int] = None) -> ModelVersion:
        """A READY version (the latest READY one when ``version`` is None); no routing policy is consulted,
        so metadata and health lookups never count as routed requests.

        ModelNotFoundError for an unknown model or version, ModelUnavailableError when it is not ready."""
        if version is not None:
            return self.select(name, version)[0]
        versions, ready = self._ready(name)
        return versions[ready[-1]]

    def _ready(self, name: str) -> tuple[dict[Optional[int], ModelVersion], list[int]]:
        """The model's versions and its READY version numbers (ascending, never empty)."""
        if self.closing:
            raise ModelUnavailableError("the server is shutting down")
        versions = self.versions(name)
        ready = sorted(v for v, mv in versions.items() if v is not None and mv.ready)
        if not ready:
            reasons = "; ".join(why for mv in versions.values() if (why := mv.failure or mv.reason)) \
                or "no version is loaded"
            raise ModelUnavailableError(f"model {name!r} is not ready: {reasons}")
        return versions, ready

    def select(self, name: str, version: Optional[int] = None,
               key: Optional[str] = None) -> tuple[ModelVersion, Optional[Route]]:
        """The version a request goes to: the one it names, else the model's routing policy's choice
        (``key`` is the request's routing key, e.g. a user id, for sticky assignment)."""
        if version is None:
            versions, ready = self._ready(name)
            try:
                route = self.router.route(name, ready, key)
            except LookupError as exc:  # a pinned version that is not loaded
                raise ModelUnavailableError(str(exc)) from None
            if self.metrics is not None:
                self.metrics.observe_route(name, route.policy, route.variant, route.version)
            return versions[route.version], route
        if self.closing:
            raise ModelUnavailableError("the server is shutting down")
        mv = self.versions(name).get(version)
        if mv is None:
            raise ModelNotFoundError(f"unknown version {version} of model {name!r}")
        if not mv.ready:
            raise ModelUnavailableError(f"model {name!r} version {version} is not ready: {mv.failure or mv.reason}")
        return mv, None

    async def run(self, mv: ModelVersion, inputs: Mapping[str, torch.Tensor], *, timeout_ms: Optional[float] = None,
                  priority: Optional[int] = None, trace: Optional[RequestTrace] = None) -> dict[str, torch.Tensor]:
        """Validate ``inputs`` (ValueError), queue them on ``mv`` and wait; statistics and metrics are kept.

        ``trace`` (optional) receives the request's queue and compute times."""
        start = time.perf_counter_ns()
        trace = trace if trace is not None else RequestTrace()
        try:
            backend, batcher = mv.backend, mv.batcher
            if backend is None or batcher is None:
                raise ModelUnavailableError(f"model {mv.name!r} version {mv.version} is not ready: {mv.reason}")
            inputs = backend.decode_inputs(inputs)
            backend.validate_inputs(inputs)
            outputs = await batcher.submit(inputs, timeout_ms=timeout_ms, priority=priority, trace=trace)
        except BaseException as exc:
            elapsed = time.perf_counter_ns() - start
            mv.stats.record_request(False, elapsed)
            if self.metrics is not None:
                self.metrics.observe_request(mv.name, mv.version, outcome_of(exc), elapsed / 1e9)
            raise
        elapsed = time.perf_counter_ns() - start
        rows = next(iter(inputs.values())).shape[0] if batcher.combine and inputs else 1
        mv.stats.record_request(True, elapsed, trace, rows)
        if self.metrics is not None:
            self.metrics.observe_request(mv.name, mv.version, "success", elapsed / 1e9, trace)
        return outputs

    async def infer(self, name: str, version: Optional[int], inputs: dict[str, torch.Tensor], *,
                    key: Optional[str] = None, timeout_ms: Optional[float] = None,
                    priority: Optional[int] = None) -> dict[str, torch.Tensor]:
        """:meth:`select` then :meth:`run`."""
        mv, _ = self.select(name, version, key)
        return await self.run(mv, inputs, timeout_ms=timeout_ms, priority=priority)

    # -- extensions: statistics, configuration, repository index ---------------------------------------

    def statistics(self, name: Optional[str] = None, version: Optional[int] = None) -> dict[str, Any]:
        """``{"model_stats": [...]}`` as Triton's statistics extension returns it (all models when no name)."""
        if name is None:
            rows = [mv.stats.to_json(n, v) for n, v, mv in self.snapshot() if v is not None]
        else:
            versions = self.versions(name)
            if version is not None and version not in versions:
                raise ModelNotFoundError(f"unknown version {version} of model {name!r}")
            rows = [mv.stats.to_json(name, v) for v, mv in sorted(versions.items(), key=lambda kv: kv[0] or 0)
                    if v is not None and (version is None or v == version)]
        return {"model_stats": rows}

    def model_config(self, name: str, version: Optional[int] = None) -> dict[str, Any]:
        """The model configuration in Triton's JSON shape (``GET v2/models/{m}/config``)."""
        mv = self.get(name, version)
        return triton_model_config(mv)

    def index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """The KServe v2 repository index ``[{name, version, state, reason}]`` with the live states."""
        rows = {(r["name"], r["version"]): r for r in self.repository.index()}
        for name, versions in self._models.items():
            for version, mv in versions.items():
                key = (name, None if version is None else str(version))
                failure = mv.failure
                rows[key] = {"name": name, "version": key[1], "state": UNAVAILABLE if failure else mv.state,
                             "reason": failure or mv.reason}
        for row in rows.values():
            if row["state"] is None:
                row["state"], row["reason"] = UNAVAILABLE, "not loaded"
        result = sorted(rows.values(), key=lambda r: (r["name"], int(r["version"] or 0)))
        return [r for r in result if r["state"] == READY] if ready_only else result


_TRITON_TYPES = {"BYTES": "TYPE_STRING"}


def triton_model_config(mv: ModelVersion) -> dict[str, Any]:
    """Triton's ``ModelConfig`` (as JSON) for a READY version: what ``tritonclient`` reads back."""
    backend, config = mv.backend, mv.config

    def tensors(specs) -> list[dict[str, Any]]:
        return [{"name": s.name, "data_type": _TRITON_TYPES.get(s.datatype, f"TYPE_{s.datatype}"),
                 "dims": list(s.shape), "optional": s.optional} for s in specs]

    result: dict[str, Any] = {
        "name": mv.name, "platform": backend.platform, "backend": config.backend,
        "max_batch_size": config.max_batch_size,
        "input": tensors(backend.wire_inputs), "output": tensors(backend.outputs),
        "instance_group": [{"name": mv.name, "kind": "KIND_CPU", "count": config.instances}],
        "version_policy": ({"all": {}} if config.version_policy.kind == "all" else
                           {"specific": {"versions": list(config.version_policy.specific)}}
                           if config.version_policy.kind == "specific" else
                           {"latest": {"num_versions": config.version_policy.latest or 1}}),
    }
    db = config.dynamic_batching
    if db is not None:
        policy: dict[str, Any] = {"timeout_action": db.timeout_action.upper(), "max_queue_size": db.max_queue_size,
                                  "allow_timeout_override": True,
                                  "default_timeout_microseconds": int((db.timeout_ms or 0) * 1000)}
        result["dynamic_batching"] = {
            "preferred_batch_size": list(db.preferred_batch_sizes),
            "max_queue_delay_microseconds": int(db.max_queue_delay_ms * 1000),
            "priority_levels": db.priority_levels,
            "default_priority_level": mv.batcher.default_priority if mv.batcher else 0,
            "default_queue_policy": policy,
        }
    return result
