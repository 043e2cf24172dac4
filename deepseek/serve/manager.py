"""The model manager: loaded model versions, their READY/UNAVAILABLE state, and the way requests reach them.

    manager = ModelManager(ModelRepository("models/"))
    await manager.load_all()                      # every selected version of every healthy model
    outputs = await manager.infer("digits", None, {"x": x})   # None: the latest READY version
    await manager.close()                         # drain the batchers, close the backends

A model with ``max_batch_size > 0`` and a ``dynamic_batching`` section gets a
:class:`~deepseek.serve.batching.DynamicBatcher`; any other model is called directly in a worker thread
under ``torch.inference_mode``. Either way the event loop never runs the model.

Nothing here raises for a broken model: a config error from the repository scan, or a backend that fails
to load, leaves the version UNAVAILABLE with the reason (shown by :meth:`ModelManager.index`). A reload
(:meth:`load` of a model already served) loads the new versions first and then swaps them in, so traffic is
not interrupted; a version whose reload fails keeps serving the old copy. Replaced versions are drained.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

from deepseek.serve.backends import Backend, load_backend
from deepseek.serve.batching import DynamicBatcher
from deepseek.serve.repository import ModelRepository

log = logging.getLogger(__name__)

READY, UNAVAILABLE = "READY", "UNAVAILABLE"


class ModelNotFoundError(LookupError):
    """No such model or version in the repository (HTTP 404)."""


class ModelUnavailableError(RuntimeError):
    """The model or version exists but is not ready, or the server is closing (HTTP 503)."""


@dataclass(eq=False)
class ModelVersion:
    """One (model, version) the manager knows of; ``backend`` is set only while READY."""

    name: str
    version: Optional[int]  # None: a broken model with no version folders
    state: str = UNAVAILABLE
    reason: str = ""
    backend: Optional[Backend] = None
    batcher: Optional[DynamicBatcher] = None
    inflight: int = 0  # direct (unbatched) calls running now
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self):
        self._idle.set()

    @property
    def ready(self) -> bool:
        return self.state == READY

    async def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.batcher is not None:
            return await self.batcher.submit(inputs)
        backend = self.backend
        if backend is None or not self.ready:
            raise ModelUnavailableError(f"model {self.name!r} version {self.version} is not ready: {self.reason}")
        self.inflight += 1
        self._idle.clear()
        try:
            return await asyncio.to_thread(_run_direct, backend, inputs)
        finally:
            self.inflight -= 1
            if not self.inflight:
                self._idle.set()

    async def shutdown(self, reason: str) -> None:
        """Stop taking requests, drain what is queued or running, then close the backend."""
        self.state, self.reason = UNAVAILABLE, reason
        if self.batcher is not None:
            await self.batcher.stop(drain=True)
        await self._idle.wait()
        if self.backend is not None:
            try:
                self.backend.close()
            except Exception as exc:  # a backend failing to close must not stop the others
                log.warning("closing %s version %s failed: %s", self.name, self.version, exc)
        self.backend, self.batcher = None, None


def _run_direct(backend: Backend, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        return backend.infer(inputs)


class ModelManager:
    """Loads the repository's models and routes inference to them (see module docs)."""

    def __init__(self, repository: ModelRepository):
        self.repository = repository
        self._models: dict[str, dict[Optional[int], ModelVersion]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.loaded = False  # load_all() has run
        self.closing = False

    # -- lifecycle ------------------------------------------------------------------------------------

    async def load_all(self) -> None:
        """Load every model of the repository; broken ones end up UNAVAILABLE with the reason."""
        names = list(await asyncio.to_thread(self.repository.scan))
        for name in names:
            await self.load(name)
        self.loaded = True

    async def load(self, name: str) -> None:
        """(Re)load one model: its selected versions are loaded, then swapped in; replaced ones drain."""
        if self.closing:
            raise ModelUnavailableError("the server is shutting down")
        async with self._locks.setdefault(name, asyncio.Lock()):
            entry = await asyncio.to_thread(self.repository.scan_model, name)
            old = self._models.get(name, {})
            new: dict[Optional[int], ModelVersion] = {}
            if entry.error is not None:
                for version in entry.versions or [None]:
                    new[version] = ModelVersion(name, version, UNAVAILABLE, entry.error)
            else:
                for version in entry.selected:
                    mv = await self._load_version(name, version, entry.config)
                    previous = old.get(version)
                    if not mv.ready and previous is not None and previous.ready:
                        log.warning("reload of %s version %s failed (%s); keeping the loaded one",
                                    name, version, mv.reason)
                        mv = previous
                    new[version] = mv
            self._models[name] = new  # the swap: new requests go to the new versions from here on
            for version, mv in old.items():
                if new.get(version) is not mv:
                    await mv.shutdown("replaced by a reload")

    async def _load_version(self, name: str, version: int, config) -> ModelVersion:
        mv = ModelVersion(name, version)
        try:
            path = self.repository.version_path(name, version)
            backend = await asyncio.to_thread(load_backend, name, version, path, config)
        except Exception as exc:  # BackendError and anything unexpected: the model is unavailable, not the server
            mv.reason = str(exc) or type(exc).__name__
            log.warning("model %s version %s is unavailable: %s", name, version, mv.reason)
            return mv
        if config.max_batch_size > 0 and config.dynamic_batching is not None:
            mv.batcher = DynamicBatcher(backend.infer, **backend.batcher_kwargs())
        mv.backend, mv.state = backend, READY
        return mv

    async def unload(self, name: str) -> None:
        """Stop serving a model: drain its batchers, close its backends. Unknown names: ModelNotFoundError."""
        if name not in self._models:
            raise ModelNotFoundError(f"unknown model {name!r}")
        async with self._locks.setdefault(name, asyncio.Lock()):
            versions = self._models.pop(name, {})
            for mv in versions.values():
                await mv.shutdown("unloaded")

    async def close(self) -> None:
        """Refuse new requests, then drain and close every loaded version."""
        self.closing = True
        for name in list(self._models):
            for mv in self._models.pop(name).values():
                await mv.shutdown("the server is shutting down")

    # -- lookups and inference ------------------------------------------------------------------------

    def versions(self, name: str) -> dict[Optional[int], ModelVersion]:
        if name not in self._models:
            raise ModelNotFoundError(f"unknown model {name!r}")
        return self._models[name]

    def get(self, name: str, version: Optional[int] = None) -> ModelVersion:
        """A READY version (the latest READY one when ``version`` is None).

        ModelNotFoundError for an unknown model or version, ModelUnavailableError when it is not ready."""
        if self.closing:
            raise ModelUnavailableError("the server is shutting down")
        versions = self.versions(name)
        if version is None:
            ready = [v for v, mv in versions.items() if v is not None and mv.ready]
            if ready:
                return versions[max(ready)]
            reasons = "; ".join(mv.reason for mv in versions.values() if mv.reason) or "no version is loaded"
            raise ModelUnavailableError(f"model {name!r} is not ready: {reasons}")
        mv = versions.get(version)
        if mv is None:
            raise ModelNotFoundError(f"unknown version {version} of model {name!r}")
        if not mv.ready:
            raise ModelUnavailableError(f"model {name!r} version {version} is not ready: {mv.reason}")
        return mv

    async def infer(self, name: str, version: Optional[int],
                    inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Validate ``inputs`` (ValueError) and run them through the model's batcher or a worker thread."""
        mv = self.get(name, version)
        mv.backend.validate_inputs(inputs)
        return await mv.run(inputs)

    def index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """The KServe v2 repository index ``[{name, version, state, reason}]`` with the live states."""
        rows = {(r["name"], r["version"]): r for r in self.repository.index()}
        for name, versions in self._models.items():
            for version, mv in versions.items():
                key = (name, None if version is None else str(version))
                rows[key] = {"name": name, "version": key[1], "state": mv.state, "reason": mv.reason}
        for row in rows.values():
            if row["state"] is None:
                row["state"], row["reason"] = UNAVAILABLE, "not loaded"
        result = sorted(rows.values(), key=lambda r: (r["name"], int(r["version"] or 0)))
        return [r for r in result if r["state"] == READY] if ready_only else result
