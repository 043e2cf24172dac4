"""Sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP): save on N ranks, resume on M.

    <run>/checkpoints/
      step-00000100/
        dcp/           DCP files: one ``__{rank}_0.distcp`` per rank that holds data, plus ``.metadata``.
                       {"model": ..., "optimizer": ...} from ``get_state_dict`` (FQN keys, no wrapper prefixes,
                       optimizer state flattened per parameter so that any layout can read it back)
        model/         config.json + tokenizer.json of a deepseek model (no weights: ``export_model_dir``)
        trainer.json   step and every other entry of the saved ``states`` (scheduler, the run's state), as JSON
        rng.pt         rank 0's generator states, as plain
        manifest.json  ``"layout": "sharded"``, size and sha256 of every other file; written last

Every rank writes its own shards (``dcp.save``); rank 0 writes the small files and the manifest, then renames
the temporary folder into place after a barrier, so a crash leaves no half-written ``step-*`` folder. The folder
protocol is the plain format's (:mod:`deepseek.checkpoint_folder`): ``latest_checkpoint`` verifies both
formats and skips corrupt ones; ``is_sharded_checkpoint`` tells them apart.

What is saved is a ``{name: Stateful}`` dict (:data:`States`): ``"model"`` (an ``nn.Module``) and ``"optimizer"`` go
to the DCP shards; every other entry goes to trainer.json under its name, as its ``state_dict()`` (a plain JSON
value is written as it is). Loading fills the Stateful entries in place and returns trainer.json's entries.

Resharding is DCP's job: a checkpoint written by 2 FSDP ranks loads into 4 DDP ranks, into tp/ep/pp layouts or
into one process without a process group (the state dict we load into decides the layout). Parameters must be
replicated, DTensors, or named by the layout as rank-local slices (``ParallelPlan.checkpoint_shards``: expert
parallelism's local experts, presented to DCP as DTensors): any other plain tensor that differs between ranks
would be de-duplicated to one rank's copy, so :func:`save_sharded_checkpoint` refuses it. A layout that shards
parameters also resumes from a plain checkpoint (:func:`load_plain_into_layout`); :func:`export_model_dir`
turns a sharded checkpoint into an ordinary model directory.
"""

from __future__ import annotations

import json
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as torch_dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from deepseek.config import ConfigError
from deepseek.parallel.tensor_parallel import without_strided_shards
from deepseek.models.config import ModelConfig
from deepseek.models.directory import FORMAT as MODEL_FORMAT
from deepseek.models.directory import FORMAT_VERSION as MODEL_FORMAT_VERSION
from deepseek.models.directory import load_config, load_tokenizer, model_from_state, save, swap_into_place
from deepseek.checkpoint_folder import (FORMAT, FORMAT_VERSION, MANIFEST, SHARDED_LAYOUT, CheckpointError,
                                                 checkpoint_dir, file_sha256, is_sharded_checkpoint, latest_checkpoint,
                                                 list_checkpoints, read_trainer_json, remove_checkpoint, remove_stale,
                                                 restore_rng_state, rng_state, torch_load, unwrap_module,
                                                 verify_checkpoint)

DCP_DIR = "dcp"
States = dict[str, Any]  # "model": nn.Module, "optimizer": Optimizer, any other name: a Stateful or a JSON value
_SHARDED = ("model", "optimizer")  # the entries that go to the DCP shards
LocalShards = dict[str, tuple[Any, tuple]]  # FQN -> (DeviceMesh, placements) of a rank-local parameter slice
# Optimizer state keyed per parameter ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr"): ranks that hold
# different parameters (pipeline stages) merge, and any other layout reads it back.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def _rank() -> int:
    return torch_dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        torch_dist.barrier()


def _load(state: dict[str, Any], **where) -> None:
    """``dcp.load`` in place, collective under a process group; without one in this process alone (quietly:
    that is the intent, e.g. a one-process run resuming what N ranks wrote)."""
    if _distributed():
        dcp.load(state, **where)
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(state, no_dist=True, **where)


def _failures(exc: BaseException) -> str:
    """One line per failed rank of a DCP CheckpointException (its str() carries every traceback)."""
    if not isinstance(exc, CheckpointException):
        return f"{type(exc).__name__}: {exc}"
    return "; ".join(f"rank {rank}: {type(error).__name__}: {error}"
                     for rank, (error, _) in sorted(exc.failures.items()))


def _state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> dict[str, Any]:
    """{"model": ..., "optimizer": ...} of the unwrapped model (DDP's ``module.`` and compile's prefixes gone);
    DTensors stay DTensors (FSDP2, tensor parallel), so every rank holds only its shards."""
    model = unwrap_module(model)
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return {"model": get_model_state_dict(model, options=_OPTIONS)}
    model_state, optim_state = get_state_dict(model, optimizer, options=_OPTIONS)
    return {"model": model_state, "optimizer": optim_state}


def _as_dtensors(state: dict[str, Any], local_shards: LocalShards) -> list[tuple[dict, str]]:
    """Present rank-local slices (expert parallelism's experts: plain parameters holding this rank's rows) and
    their optimizer moments as DTensors over the mesh, sharing storage, so that DCP stores one whole tensor;
    returns where it replaced them (for :func:`_as_local`)."""
    replaced = []
    model_state, optim_state = state["model"], state.get("optimizer", {})
    for fqn, (mesh, placements) in local_shards.items():
        shape = model_state[fqn].shape
        keys = [(model_state, fqn)] + [(optim_state, k) for k, v in optim_state.items()
                                       if k.startswith(f"state.{fqn}.") and isinstance(v, torch.Tensor)
                                       and v.shape == shape]
        for where, key in keys:
            where[key] = DTensor.from_local(where[key], mesh, placements, run_check=False)
            replaced.append((where, key))
    return replaced


def _as_local(replaced: list[tuple[dict, str]]) -> None:
    for where, key in replaced:
        where[key] = where[key].to_local()


# -- saving ------------------------------------------------------------------------------------------

def save_sharded_checkpoint(root: str | Path, step: int, states: States, *, tokenizer=None, keep_last: int = 3,
                            local_shards: Optional[LocalShards] = None) -> Path:
    """Every rank writes its shards of ``states["model"]`` and ``states["optimizer"]`` to ``root/step-NNNNNNNN``;
    rank 0 writes the rest of ``states`` (trainer.json), the RNG state and the model's config + ``tokenizer``,
    then renames the folder into place. Collective: every rank calls it. Returns the folder; keeps the
    ``keep_last`` newest checkpoints (0: all).

    ``local_shards`` names plain parameters that hold this rank's slice of a whole one, with the mesh and
    placements that say which (``ParallelPlan.checkpoint_shards``)."""
    root = Path(root)
    rank = _rank()
    final = checkpoint_dir(root, step)
    model = states["model"]
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step,
              **{name: value.state_dict() if hasattr(value, "state_dict") else value
                 for name, value in states.items() if name not in _SHARDED}}
    try:  # fail before writing anything
        trainer_json = json.dumps(record, indent=2) + "\n"
    except (TypeError, ValueError) as exc:
        raise TypeError(f"checkpoint state and scheduler state must be JSON-serializable: {exc}") from exc

    name = [f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"]  # rank 0's name for the temporary folder
    if _distributed():
        torch_dist.broadcast_object_list(name, src=0)
    tmp = root / name[0]
    state, _ = without_strided_shards(_state(model, states.get("optimizer")))  # tensor-parallel gate_up
    _as_dtensors(state, local_shards or {})
    _refuse_rank_local_tensors(state)
    if rank == 0:
        tmp.mkdir(parents=True)
        (tmp / "trainer.json").write_text(trainer_json)
        torch.save(rng_state(), tmp / "rng.pt")
        _write_model_files(model, tokenizer, tmp / "model")
    _barrier()
    dcp.save(state, checkpoint_id=tmp / DCP_DIR)  # collective; returns once every rank's shards and .metadata exist
    _barrier()
    if rank == 0:
        try:
            _finish(tmp, final, step)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        remove_stale(root)
        if keep_last > 0:
            for old in list_checkpoints(root)[:-keep_last]:
                if old != final:
                    remove_checkpoint(old)
    _barrier()
    return final


def _write_model_files(model: nn.Module, tokenizer, folder: Path) -> None:
    """config.json and tokenizer.json of a model directory (the weights stay in the DCP shards)."""
    config = getattr(unwrap_module(model), "config", None)
    if tokenizer is None or not isinstance(config, ModelConfig):
        return  # a generic module: nothing to export it with
    folder.mkdir()
    meta = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, **config.to_dict()}
    (folder / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    tokenizer.save(str(folder / "tokenizer.json"))


def _finish(tmp: Path, final: Path, step: int) -> None:
    files = {f.relative_to(tmp).as_posix(): {"size": f.stat().st_size, "sha256": file_sha256(f)}
             for f in sorted(tmp.rglob("*")) if f.is_file()}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, "layout": SHARDED_LAYOUT,
                "world_size": torch_dist.get_world_size() if _distributed() else 1, "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    swap_into_place(tmp, final)


def _refuse_rank_local_tensors(state: dict[str, Any]) -> None:
    """DCP keeps one copy of a plain tensor that several ranks hold under one name (it assumes replicas). A
    layout whose ranks hold different plain tensors under the same name (local experts, renamed pipeline stages)
    would lose data silently: compare a checksum of every plain tensor over the ranks and refuse."""
    if not _distributed() or torch_dist.get_world_size() == 1:
        return
    local: dict[str, tuple] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                visit(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                visit(f"{prefix}.{i}", v)
        elif isinstance(value, torch.Tensor) and not isinstance(value, DTensor):
            local[prefix] = (tuple(value.shape), float(value.detach().double().sum()))

    visit("", state)
    everyone: list[Optional[dict[str, tuple]]] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(everyone, local)
    for key, (shape, total) in local.items():
        for other, theirs in enumerate(everyone):
            shape_o, total_o = theirs.get(key, (shape, total))
            if shape_o != shape or abs(total_o - total) > 1e-6 * max(1.0, abs(total)):
                raise ConfigError(
                    f"sharded checkpoint: {key} is a plain tensor that differs between rank {_rank()} and rank "
                    f"{other} (shape {shape} vs {shape_o}); DCP would keep only one rank's copy. A layout with "
                    f"rank-local (non-DTensor) parameters must name them in Parallelism.checkpoint_shards")


# -- loading -----------------------------------------------------------------------------------------

def load_sharded_checkpoint(path: str | Path, states: States, *, restore_rng: bool = True, verify: bool = True,
                            local_shards: Optional[LocalShards] = None) -> dict[str, Any]:
    """Restore a sharded checkpoint into this process's ``states`` (``"model"``, optionally ``"optimizer"``, and any
    Stateful entry saved in trainer.json, e.g. ``"scheduler"``), whatever the layout it was written with; returns
    trainer.json's entries (``"step"``, ``"state"``, ...). Collective when a process group exists (every rank calls
    it); works without one. Raises :class:`CheckpointError` naming the file and the reason."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder")
    if verify:
        verify_checkpoint(path)
    if not is_sharded_checkpoint(path):
        raise CheckpointError(f"{path} is a plain checkpoint, not a sharded one")
    record = read_trainer_json(path / "trainer.json")
    model, optimizer = states["model"], states.get("optimizer")
    state = _state(model, optimizer)
    replaced = _as_dtensors(state, local_shards or {})
    try:
        stored, copy_back = without_strided_shards(state)  # tensor-parallel gate_up: read into plain shards
        _load(stored, checkpoint_id=path / DCP_DIR)
        copy_back()
        _copy_values(state, stored)
    except (Exception, CheckpointException) as exc:  # the latter, a BaseException, collects every rank's failure
        raise CheckpointError(f"{path / DCP_DIR}: cannot read the sharded model/optimizer state: "
                              f"{_failures(exc)}") from exc
    _as_local(replaced)  # loaded in place: the plain slices hold their rows now
    try:
        set_state_dict(unwrap_module(model), optimizer if optimizer is not None else [],
                       model_state_dict=state["model"], optim_state_dict=state.get("optimizer", {}),
                       options=_OPTIONS)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path / DCP_DIR}: the state does not fit the model or optimizer: {exc}") from exc
    for name, value in _json_statefuls(states):
        if record.get(name) is None:
            raise CheckpointError(f"{path / 'trainer.json'} holds no {name} state (saved without a {name})")
        value.load_state_dict(record[name])
    if restore_rng:
        restore_rng_state(path / "rng.pt")
    return record


def _json_statefuls(states: States) -> list[tuple[str, Any]]:
    """The entries of ``states`` that trainer.json restores in place (a scheduler, ...)."""
    return [(name, value) for name, value in states.items()
            if name not in _SHARDED and hasattr(value, "load_state_dict")]


def _copy_values(dst: dict, src: dict) -> None:
    """Non-tensor entries (optimizer hyper-parameters) that ``dcp.load`` replaced in ``src`` (a converted copy of
    ``dst``): put them into ``dst`` too. Tensors were loaded in place (or copied back)."""
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _copy_values(dst[key], value)
        elif not isinstance(value, torch.Tensor):
            dst[key] = value


def export_model_dir(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write the model of a sharded checkpoint as an ordinary model directory (``ds.load`` opens it).

    Needs no process group: the shards are read in this process and assembled into full tensors.
    """
    checkpoint = Path(checkpoint)
    verify_checkpoint(checkpoint)
    if not is_sharded_checkpoint(checkpoint):
        raise CheckpointError(f"{checkpoint} is a plain checkpoint: its model/ folder already is a model directory")
    folder = checkpoint / "model"
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder / 'config.json'} is missing: the checkpoint is not of a deepseek model "
                              f"saved with its tokenizer")
    config, tokenizer = load_config(folder), load_tokenizer(folder)
    reader = dcp.FileSystemReader(str(checkpoint / DCP_DIR))
    stored = reader.read_metadata().state_dict_metadata
    with torch.device("meta"):
        from deepseek.models.transformer import MoETransformer

        names = list(MoETransformer(config).state_dict())
    weights = {}
    for name in names:
        meta = stored.get(f"model.{name}")
        if meta is None:
            raise CheckpointError(f"{checkpoint / DCP_DIR}: holds no weight {name}")
        weights[name] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    _load({"model": weights}, storage_reader=reader)
    model = model_from_state(config, weights, str(checkpoint), error=CheckpointError)
    return save(model, tokenizer, out_dir)


def load_plain_into_layout(path: str | Path, states: States, *, local_shards: Optional[LocalShards] = None,
                           restore_rng: bool = True) -> dict[str, Any]:
    """Restore a plain checkpoint (whole tensors, written by one process or DDP's rank 0) into a layout that
    shards the parameters (FSDP2, tensor or expert parallel): every rank reads the whole tensors and keeps its
    own pieces. ``states`` as for :func:`load_sharded_checkpoint` (an optimizer is required); returns trainer.json's
    entries. Collective: every rank calls it."""
    from torch.distributed.tensor import distribute_tensor

    from deepseek.models.directory import ModelDirectoryError, load_weights

    path = Path(path)
    model, optimizer = states["model"], states["optimizer"]
    record = read_trainer_json(path / "trainer.json")
    try:
        weights = load_weights(path / "model")
    except ModelDirectoryError as exc:
        raise CheckpointError(str(exc)) from exc
    saved = torch_load(path / "optimizer.pt")
    # optimizer.pt numbers the parameters in param-group order; this optimizer holds the same ones, by name
    names = {id(p): n for n, p in unwrap_module(model).named_parameters()}
    fqns = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in saved["param_groups"] for i in group["params"]]
    if len(ids) != len(fqns):
        raise CheckpointError(f"{path / 'optimizer.pt'} holds {len(ids)} parameters, the optimizer {len(fqns)}")
    fqn = dict(zip(ids, fqns))
    source = {"model": weights, "optimizer": {}}  # in get_state_dict's flattened form
    for i, entries in saved["state"].items():
        source["optimizer"].update({f"state.{fqn[i]}.{k}": v for k, v in entries.items()})
    for group in saved["param_groups"]:
        for i in group["params"]:
            source["optimizer"].update({f"param_groups.{fqn[i]}.{k}": v for k, v in group.items() if k != "params"})

    state = _state(model, optimizer)
    replaced = _as_dtensors(state, local_shards or {})
    stored, copy_back = without_strided_shards(state)
    with torch.no_grad():
        for section, entries in stored.items():
            for key, target in entries.items():
                if key not in source[section]:
                    raise CheckpointError(f"{path}: holds no {section} entry {key}")
                value = source[section][key]
                if isinstance(target, DTensor):  # every rank has the whole tensor: keep its own piece
                    piece = distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements,
                                              src_data_rank=None)
                    target.to_local().copy_(piece.to_local())
                elif isinstance(target, torch.Tensor):
                    target.copy_(value)
                else:
                    entries[key] = value
        copy_back()
    _copy_values(state, stored)
    _as_local(replaced)
    set_state_dict(unwrap_module(model), optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_OPTIONS)
    for name, value in _json_statefuls(states):
        if record.get(name) is not None:
            value.load_state_dict(record[name])
    if restore_rng:
        restore_rng_state(path / "rng.pt")
    return record


def resume_sharded(root: str | Path, states: States,
                   local_shards: Optional[LocalShards] = None) -> Optional[tuple[Path, dict[str, Any]]]:
    """A layout that shards the parameters resumes from the newest valid checkpoint under ``root``, sharded (DCP
    resharding) or plain (each rank keeps its pieces of the whole tensors): ``(its folder, trainer.json's entries)``,
    or None when there is none."""
    path = latest_checkpoint(root)
    if path is None:
        return None
    if is_sharded_checkpoint(path):
        return path, load_sharded_checkpoint(path, states, verify=False, local_shards=local_shards)
    return path, load_plain_into_layout(path, states, local_shards=local_shards)


__all__ = ["DCP_DIR", "export_model_dir", "load_plain_into_layout", "load_sharded_checkpoint", "resume_sharded",
           "save_sharded_checkpoint"]
