"""The model repository: what ``ds serve`` can serve, as laid out on disk (Triton's layout).

    <repo>/<model>/config.yaml     a ServingConfig (see deepseek/serve/config.py)
    <repo>/<model>/<version>/      one folder per version: 1, 2, 10, ... (positive integers)

A version of a ``deepseek`` model is a model directory; a model folder without ``config.yaml`` whose
version folders are model directories is served with the implicit config ``backend: deepseek``.

:meth:`ModelRepository.scan` never raises for one bad model: a broken ``config.yaml`` gives a
:class:`ModelEntry` with ``error`` set, which the server reports UNAVAILABLE. Hidden folders and
non-numeric version folders are ignored; a model folder whose name is not ``[A-Za-z0-9_.-]+`` (names
become URL path parts) is ignored with a warning. :class:`RepositoryWatcher` diffs two scans for
``--model-control poll``. Nothing here loads a backend.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from deepseek.config import ConfigError
from deepseek.models.directory import FORMAT
from deepseek.serve.config import ServingConfig, load_serving_config

CONFIG_FILE = "config.yaml"
MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]+")
VERSION_NAME = re.compile(r"[1-9][0-9]*")  # canonical positive integers: "01" is not a version


@dataclass
class ModelEntry:
    name: str
    config: Optional[ServingConfig]
    versions: list[int] = field(default_factory=list)  # numeric version folders on disk, sorted
    selected: list[int] = field(default_factory=list)  # the versions the policy serves
    error: Optional[str] = None  # why the model cannot be served (config missing or invalid, nothing selected)
    config_hash: Optional[str] = None  # sha256 of config.yaml; None when implicit or unreadable

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class RepositoryChanges:
    added: list[tuple[str, int]] = field(default_factory=list)
    removed: list[tuple[str, int]] = field(default_factory=list)
    changed_config: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed_config)


def valid_model_name(name: str) -> bool:
    return bool(MODEL_NAME.fullmatch(name)) and name not in (".", "..")


def is_model_directory(path: Path) -> bool:
    """Whether ``path`` holds a ``config.json`` with ``"format": "deepseek-moe"`` (the weights are not checked)."""
    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


class ModelRepository:
    """A model repository folder (see module docs)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._warned: set[str] = set()  # invalid names already warned about (poll scans repeatedly)

    def _model_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            raise FileNotFoundError(f"model repository {self.root} is not a directory")
        folders = []
        for path in sorted(self.root.iterdir()):
            if path.name.startswith(".") or not path.is_dir():
                continue
            if not valid_model_name(path.name):
                if path.name in self._warned:
                    continue
                self._warned.add(path.name)
                warnings.warn(f"model repository {self.root}: ignoring {path.name!r} "
                              f"(model names must match [A-Za-z0-9_.-]+)", stacklevel=3)
                continue
            folders.append(path)
        return folders

    @staticmethod
    def _versions(folder: Path) -> list[int]:
        return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and VERSION_NAME.fullmatch(p.name))

    def scan_model(self, name: str) -> ModelEntry:
        """The entry of one model folder; problems go into ``entry.error``, never raised."""
        folder = self.root / name
        try:
            versions = self._versions(folder)
        except OSError as exc:
            return ModelEntry(name, None, error=f"cannot list {folder}: {exc.strerror or exc}")
        entry = ModelEntry(name, None, versions)
        file = folder / CONFIG_FILE
        if file.is_file():
            try:
                entry.config_hash = hashlib.sha256(file.read_bytes()).hexdigest()
                entry.config = load_serving_config(file)
            except OSError as exc:
                entry.error = f"cannot read {file}: {exc.strerror or exc}"
                return entry
            except ConfigError as exc:
                entry.error = str(exc)
                return entry
        elif any(is_model_directory(folder / str(v)) for v in versions):
            entry.config = ServingConfig(backend="deepseek")
        else:
            entry.error = f"{file} is missing (and no version folder is a deepseek model directory)"
            return entry
        if not versions:
            entry.error = f"{folder} has no version folders (1/, 2/, ...)"
            return entry
        entry.selected = entry.config.version_policy.select(versions)
        if not entry.selected:
            entry.error = (f"version_policy {entry.config.version_policy.specific} selects none of the "
                           f"versions on disk {versions}")
        return entry

    def scan(self) -> dict[str, ModelEntry]:
        """Every model of the repository by name (sorted), broken ones included with ``error`` set."""
        return {folder.name: self.scan_model(folder.name) for folder in self._model_dirs()}

    def version_path(self, name: str, version: int) -> Path:
        """The folder of one version; ValueError for a name or version that could not be in the repository."""
        if not valid_model_name(name):
            raise ValueError(f"invalid model name {name!r}: must match [A-Za-z0-9_.-]+")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"invalid model version {version!r}: must be a positive integer")
        return self.root / name / str(version)

    def index(self) -> list[dict[str, Any]]:
        """The on-disk repository index in the KServe v2 shape: ``[{name, version, state, reason}]``.

        One row per selected version of a healthy model, with ``state`` None (the server overlays the live
        READY/LOADING/... state). A broken model gives one row per version on disk, or a single row with
        ``version`` None when it has none, each with ``state`` "UNAVAILABLE" and the error as ``reason``.
        """
        rows = []
        for name, entry in self.scan().items():
            if entry.error is not None:
                for version in entry.versions or [None]:
                    rows.append({"name": name, "version": None if version is None else str(version),
                                 "state": "UNAVAILABLE", "reason": entry.error})
            else:
                rows.extend({"name": name, "version": str(v), "state": None, "reason": ""} for v in entry.selected)
        return rows


class RepositoryWatcher:
    """Diffs successive scans (``--model-control poll``): selected versions and config.yaml hashes.

    The first :meth:`poll` reports every selected version as added. A model whose config.yaml content
    changes (including becoming broken or fixed) is in ``changed_config``; the server reloads it. Files
    replaced inside an existing version folder are not detected.
    """

    def __init__(self, repo: ModelRepository | str | Path):
        self.repo = repo if isinstance(repo, ModelRepository) else ModelRepository(repo)
        self._selected: set[tuple[str, int]] = set()
        self._hashes: dict[str, Optional[str]] = {}
        self.entries: dict[str, ModelEntry] = {}

    def poll(self) -> RepositoryChanges:
        entries = self.repo.scan()
        selected = {(name, v) for name, e in entries.items() for v in e.selected}
        hashes = {name: e.config_hash for name, e in entries.items()}
        changes = RepositoryChanges(
            added=sorted(selected - self._selected),
            removed=sorted(self._selected - selected),
            changed_config=sorted(n for n in hashes if n in self._hashes and hashes[n] != self._hashes[n]),
        )
        self._selected, self._hashes, self.entries = selected, hashes, entries
        return changes
