"""Training checkpoints: everything a run needs to continue bit for bit, written atomically.

    <run>/checkpoints/
      step-00000100/
        model/         a model directory (``ds.save``) for a MoETransformer saved with its tokenizer,
                       else just model.safetensors (any nn.Module)
        optimizer.pt   optimizer.state_dict() (torch.save; read back with weights_only=True)
        trainer.json   step, scheduler state and the caller's ``state`` (clipper, data loader, ...)
        rng.pt         torch CPU (and CUDA) generator states, Python ``random`` and NumPy global states
        manifest.json  size and sha256 of every other file; written last

A checkpoint folder is written into a temporary sibling, fsynced and renamed into place, so a crash
leaves no half-written ``step-*`` folder; :func:`latest_checkpoint` also checks every file against the
manifest and falls back to an older checkpoint, with a warning, when one is truncated or corrupt.
Nothing is unpickled: weights are safetensors, the rest JSON or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
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

from deepseek.models.directory import (ModelDirectoryError, _state_for_saving, load_config, load_weights, save,
                                       save_weights, write_atomically)
from deepseek.models.transformer import MoETransformer

FORMAT = "deepseek-train-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARDED_LAYOUT = "sharded"  # manifest "layout" of deepseek.parallel.checkpoint's DCP checkpoints (model + optimizer in dcp/)
_STEP_DIR = re.compile(r"step-(\d+)")
# Left next to the checkpoints by a crash inside write_atomically or a deletion: .step-00000100.tmp-1a2b3c4d
_STALE_DIR = re.compile(r"\.(step-\d+)\.(tmp|old|del)-[0-9a-f]+")


class CheckpointError(RuntimeError):
    """A checkpoint is missing a file, a file is corrupt, or it does not fit the model or optimizer."""


# -- writing ---------------------------------------------------------------------------------------

def checkpoint_dir(root: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives under ``root``: ``root/step-{step:08d}``."""
    return Path(root) / f"step-{step:08d}"


def save_checkpoint(root: str | Path, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
                    state: Optional[dict[str, Any]] = None, tokenizer=None, keep_last: int = 3) -> Path:
    """Write the checkpoint of ``step`` under ``root`` atomically; returns its folder.

    ``state`` is anything else the run needs back (clipper, data loader, metrics) and must be
    JSON-serializable; so must ``scheduler.state_dict()``. With a ``tokenizer`` the model (a
    MoETransformer) is saved as a full model directory that ``ds.load`` opens. Afterwards only the
    ``keep_last`` newest checkpoints are kept (0 keeps all; the one just written is never deleted),
    and leftovers of an interrupted save are removed.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    root = Path(root)
    trainer = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step,
               "scheduler": scheduler.state_dict() if scheduler is not None else None, "state": state or {}}
    try:  # fail before writing anything
        trainer_json = json.dumps(trainer, indent=2) + "\n"
    except (TypeError, ValueError) as exc:
        raise TypeError(f"checkpoint state and scheduler state must be JSON-serializable: {exc}") from exc

    def write_into(folder: Path) -> None:
        _save_model(model, tokenizer, folder / "model")
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        (folder / "trainer.json").write_text(trainer_json)
        torch.save(_rng_state(), folder / "rng.pt")
        files = {f.relative_to(folder).as_posix(): {"size": f.stat().st_size, "sha256": _sha256(f)}
                 for f in sorted(folder.rglob("*")) if f.is_file()}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, "files": files}
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    path = write_atomically(checkpoint_dir(root, step), write_into)
    _remove_stale(root)
    if keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            if old != path:
                _remove(old)
    return path


def _unwrap(model: nn.Module) -> nn.Module:
    # The same unwrapping as the model directory: torch.compile's `_orig_mod`, DDP's `module`.
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def _save_model(model: nn.Module, tokenizer, folder: Path) -> None:
    module = _unwrap(model)
    if tokenizer is not None:
        save(module, tokenizer, folder)
        return
    folder.mkdir()
    state = _state_for_saving(module)
    # safetensors refuses tensors that share memory (a head tied to the embedding in a generic module):
    # store a copy under each name; loading copies the same values into the one shared parameter.
    seen = set()
    for name, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            state[name] = tensor.clone()
        seen.add(ptr)
    save_weights(state, folder)


def _rng_state() -> dict[str, Any]:
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _remove(path: Path) -> None:
    # Rename first: a crash mid-deletion leaves a hidden .del- folder (cleaned later), never a
    # half-deleted step-* folder that looks like a checkpoint.
    trash = path.parent / f".{path.name}.del-{uuid.uuid4().hex[:8]}"
    path.rename(trash)
    shutil.rmtree(trash)


def _remove_stale(root: Path) -> None:
    for entry in root.iterdir():
        match = _STALE_DIR.fullmatch(entry.name)
        if not match or not entry.is_dir():
            continue
        target = root / match[1]
        if match[2] == "old" and not target.exists():
            entry.rename(target)  # crashed between moving the old checkpoint aside and moving the new one in
        else:
            shutil.rmtree(entry, ignore_errors=True)


# -- finding ---------------------------------------------------------------------------------------

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
        if _sha256(file) != sha256:
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


# -- reading ---------------------------------------------------------------------------------------

def load_checkpoint(path: str | Path, *, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None, restore_rng: bool = True,
                    verify: bool = True) -> dict[str, Any]:
    """Restore a checkpoint into existing objects; returns the ``state`` dict given to :func:`save_checkpoint`.

    Weights are copied into ``model``'s parameters in place (strict: every name and shape must match),
    so an optimizer built on them stays valid. ``optimizer`` and ``scheduler`` get their exact state
    back (AdamW step counts and moments included), and with ``restore_rng`` the torch, CUDA, Python
    and NumPy generators too: continuing from here reproduces an uninterrupted run bit for bit.
    ``verify`` re-checks every file against the manifest (:func:`latest_checkpoint` already did).
    Raises :class:`CheckpointError` naming the file and the reason.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder")
    if verify:
        verify_checkpoint(path)
    if is_sharded_checkpoint(path):
        raise CheckpointError(f"{path} is a sharded checkpoint: read it with "
                              f"deepseek.parallel.checkpoint.load_sharded_checkpoint")
    trainer = _read_trainer(path / "trainer.json")
    _load_model(path / "model", model)
    if optimizer is not None:
        file = path / "optimizer.pt"
        opt_state = _torch_load(file)
        try:
            optimizer.load_state_dict(opt_state)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{file} does not fit the optimizer: {exc}") from exc
    if scheduler is not None:
        if trainer["scheduler"] is None:
            raise CheckpointError(f"{path / 'trainer.json'} holds no scheduler state (saved without a scheduler)")
        try:
            scheduler.load_state_dict(trainer["scheduler"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path / 'trainer.json'}: scheduler state does not fit: {exc!r}") from exc
    if restore_rng:
        _restore_rng(path / "rng.pt")
    return trainer["state"]


def _read_trainer(file: Path) -> dict[str, Any]:
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


def _load_model(folder: Path, model: nn.Module) -> None:
    module = _unwrap(model)
    try:
        weights = load_weights(folder)
        config = load_config(folder) if (folder / "config.json").is_file() else None
    except ModelDirectoryError as exc:
        raise CheckpointError(str(exc)) from exc
    if config is not None and isinstance(module, MoETransformer) and config != module.config:
        saved, current = dataclasses.asdict(config), dataclasses.asdict(module.config)
        changed = ", ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in saved if saved[k] != current[k])
        warnings.warn(f"{folder / 'config.json'} differs from the model's config ({changed})", stacklevel=3)
    try:
        module.load_state_dict(weights, strict=True)  # copies into the existing parameters
    except RuntimeError as exc:
        raise CheckpointError(f"{folder}: the weights do not fit the model: {exc}") from exc


def _torch_load(file: Path) -> Any:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling raises many types (UnpicklingError, EOFError, RuntimeError, ...)
        raise CheckpointError(f"{file} is corrupt or not loadable with weights_only=True: {exc}") from exc


def _restore_rng(file: Path) -> None:
    state = _torch_load(file)
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
