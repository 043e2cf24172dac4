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
manifest and falls back to an older checkpoint, with a warning, when one is truncated or corrupt (the folder
protocol, shared with the sharded format, is :mod:`deepseek.checkpoint_folder`).
Nothing is unpickled: weights are safetensors, the rest JSON or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from deepseek.models.directory import (ModelDirectoryError, _state_for_saving, load_config, load_weights, save,
                                       save_weights, write_atomically)
from deepseek.models.transformer import MoETransformer
# The folder protocol both formats share; its public names are this module's too.
from deepseek.checkpoint_folder import (FORMAT, FORMAT_VERSION, MANIFEST, CheckpointError, checkpoint_dir,
                                                 checkpoint_step, file_sha256, is_sharded_checkpoint,
                                                 latest_checkpoint, list_checkpoints, read_trainer_json,
                                                 remove_checkpoint, remove_stale, restore_rng_state, rng_state,
                                                 torch_load, unwrap_module, verify_checkpoint)

__all__ = ["CheckpointError", "checkpoint_dir", "checkpoint_step", "is_sharded_checkpoint", "latest_checkpoint",
           "list_checkpoints", "load_checkpoint", "save_checkpoint", "verify_checkpoint"]


# -- writing ---------------------------------------------------------------------------------------

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
        torch.save(rng_state(), folder / "rng.pt")
        files = {f.relative_to(folder).as_posix(): {"size": f.stat().st_size, "sha256": file_sha256(f)}
                 for f in sorted(folder.rglob("*")) if f.is_file()}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, "files": files}
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    path = write_atomically(checkpoint_dir(root, step), write_into)
    remove_stale(root)
    if keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            if old != path:
                remove_checkpoint(old)
    return path


def _save_model(model: nn.Module, tokenizer, folder: Path) -> None:
    module = unwrap_module(model)
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
    trainer = read_trainer_json(path / "trainer.json")
    _load_model(path / "model", model)
    if optimizer is not None:
        file = path / "optimizer.pt"
        opt_state = torch_load(file)
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
        restore_rng_state(path / "rng.pt")
    return trainer["state"]


def _load_model(folder: Path, model: nn.Module) -> None:
    module = unwrap_module(model)
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


