"""The checkpoint folder that the plain (rank 0) and the sharded (DCP) formats share.

    <run>/checkpoints/
      step-00000100/   one checkpoint: trainer.json, rng.pt, the format's own files, manifest.json written last
      .step-00000100.tmp-1a2b3c4d   what a crash during a save or a deletion leaves (cleaned by the next save)

The manifest lists the size and sha256 of every other file; a sharded checkpoint's says ``"layout": "sharded"``.
:func:`latest_checkpoint` verifies both formats and skips corrupt ones; the formats themselves live in
:mod:`deepseek.train.checkpoint` (plain) and :mod:`deepseek.parallel.checkpoint` (sharded).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from deepseek.errors import UserFacingError

FORMAT = "deepseek-train-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARDED_LAYOUT = "sharded"  # manifest "layout" of deepseek.parallel.checkpoint (model + optimizer in dcp/)
_STEP_DIR = re.compile(r"step-(\d+)")
# Left next to the checkpoints by a crash inside write_atomically or a deletion: .step-00000100.tmp-1a2b3c4d
_STALE_DIR = re.compile(r"\.(step-\d+)\.(tmp|old|del)-[0-9a-f]+")


class CheckpointError(UserFacingError, RuntimeError):
    """A checkpoint is missing a file, a file is corrupt, or it does not fit the model or optimizer."""


def checkpoint_dir(root: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives under ``root``: ``root/step-{step:08d}``."""
    return Path(root) / f"step-{step:08d}"


def unwrap_module(model: nn.Module) -> nn.Module:
    # The same unwrapping as the model directory: torch.compile's `_orig_mod`, DDP's `module`.
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def rng_state() -> dict[str, Any]:
    # Plain tensors, lists and numbers only, so that torch.load(weights_only=True) reads it back.
    version, internal, gauss_next = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {"name": name, "key": key.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def remove_checkpoint(path: Path) -> None:
    # Rename first: a crash mid-deletion leaves a hidden .del- folder (cleaned later), never a
    # half-deleted step-* folder that looks like a checkpoint.
    trash = path.parent / f".{path.name}.del-{uuid.uuid4().hex[:8]}"
    path.rename(trash)
    shutil.rmtree(trash)


def remove_stale(root: Path) -> None:
    for entry in root.iterdir():
        match = _STALE_DIR.fullmatch(entry.name)
        if not match or not entry.is_dir():
            continue
        target = root / match[1]
        if match[2] == "old" and not target.exists():
            entry.rename(target)  # crashed between moving the old checkpoint aside and moving the new one in
        else:
            shutil.rmtree(entry, ignore_errors=True)


def checkpoint_step(path: str | Path) -> int:
    """The step of a checkpoint folder, from its name ``step-{step:08d}``."""
    match = _STEP_DIR.fullmatch(Path(path).name)
    if not match:
        raise CheckpointError(f"{path} is not a checkpoint folder (expected a name like step-00000100)")
    return int(match[1])


def list_checkpoints(root: str | Path) -> list[Path]:
    """The ``step-*`` folders under ``root``, oldest step first (not verified; temporary folders ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=checkpoint_step)


def verify_checkpoint(path: str | Path) -> None:
    """Check that the manifest exists and every file it lists has its size and sha256; else raise CheckpointError."""
    path = Path(path)
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise CheckpointError(f"{manifest_file} is missing (incomplete checkpoint)")
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
        entries = [(rel, int(e["size"]), str(e["sha256"])) for rel, e in files.items()]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{manifest_file} is corrupt: {exc!r}") from exc
    listed = {rel for rel, _, _ in entries}
    sharded = isinstance(manifest, dict) and manifest.get("layout") == SHARDED_LAYOUT
    required = ("dcp/.metadata", "trainer.json", "rng.pt") if sharded else ("optimizer.pt", "trainer.json", "rng.pt")
    missing = [name for name in required if name not in listed]
    if missing or not (sharded or any(rel.startswith("model/") for rel in listed)):
        raise CheckpointError(f"{manifest_file} is corrupt: it does not list {', '.join(missing) or 'model/'}")
    for rel, size, sha256 in entries:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointError(f"{manifest_file} is corrupt: it lists a path outside the checkpoint: {rel}")
        file = path / rel
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        actual = file.stat().st_size
        if actual != size:
            raise CheckpointError(f"{file} is truncated or changed: {actual} bytes, the manifest says {size}")
        if file_sha256(file) != sha256:
            raise CheckpointError(f"{file} is corrupt: its sha256 does not match the manifest")


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a sharded (DCP) checkpoint of :mod:`deepseek.parallel.checkpoint`, by its manifest."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(manifest, dict) and manifest.get("layout") == SHARDED_LAYOUT


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The newest valid checkpoint under ``root``, or None.

    Invalid ones (partial, truncated, corrupt) are skipped with a warning and the next older is tried.
    """
    for path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            warnings.warn(f"skipping checkpoint {path}: {exc}", stacklevel=2)
            continue
        return path
    return None


def read_trainer_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    try:
        trainer = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} is corrupt: not valid JSON ({exc})") from exc
    if not isinstance(trainer, dict) or trainer.get("format") != FORMAT or not isinstance(trainer.get("state"), dict):
        raise CheckpointError(f"{file} is corrupt: not a {FORMAT} trainer state")
    if trainer.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{file}: format_version {trainer['format_version']} is newer than this "
                              f"framework reads ({FORMAT_VERSION})")
    return trainer


def torch_load(file: Path) -> Any:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling raises many types (UnpicklingError, EOFError, RuntimeError, ...)
        raise CheckpointError(f"{file} is corrupt or not loadable with weights_only=True: {exc}") from exc


def restore_rng_state(file: Path) -> None:
    state = torch_load(file)
    try:
        torch.set_rng_state(state["torch"])
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
        npy = state["numpy"]
        np.random.set_state((npy["name"], np.asarray(npy["key"], dtype=np.uint32), npy["pos"],
                             npy["has_gauss"], npy["cached_gaussian"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{file} is corrupt: {exc!r}") from exc
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            warnings.warn(f"{file} holds {len(state['cuda'])} CUDA generator states but {torch.cuda.device_count()} "
                          "devices are visible; CUDA generators not restored", stacklevel=3)
