"""The model directory: the one contract every stage reads and writes (see ARCHITECTURE.md).

    config.json        model config (architecture + vocabulary size)
    model.safetensors  weights (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
    tokenizer.json     Hugging Face `tokenizers` format
    generation.json    default sampling parameters (optional)
    compression.json   how the model was compressed (optional)

Writes are atomic: everything goes to a temporary sibling folder, is fsynced, and is renamed into
place, so a crash leaves either the old directory or the new one, never a mix. Weights are read
with safetensors (no pickle); every failure names the file and the reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from deepseek.atomic import swap_into_place, write_atomically  # noqa: F401 - re-exported
from deepseek.config import ConfigError
from deepseek.errors import UserFacingError
from deepseek.models.config import ModelConfig
from deepseek.models.transformer import MoETransformer
from deepseek.nn.quantized import SCHEMES, quantize_modules

FORMAT = "deepseek-moe"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


class ModelDirectoryError(UserFacingError, RuntimeError):
    """A model directory is missing a file, or a file in it is corrupt."""


# -- writing ---------------------------------------------------------------------------------------

def _state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Unwrap torch.compile / DDP wrappers so names never carry `_orig_mod.` or `module.` prefixes.
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        model = getattr(model, "_orig_mod", None) or model.module
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def save_weights(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int = 4 << 30) -> None:
    """Write ``state`` as one safetensors file, or as shards plus an index when larger than ``max_shard_bytes``."""
    total = sum(t.numel() * t.element_size() for t in state.values())
    if total <= max_shard_bytes:
        save_file(state, folder / WEIGHTS, metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2))


def save(model: MoETransformer, tokenizer: Tokenizer, path: str | Path, *,
         generation: Optional[dict[str, Any]] = None, compression: Optional[dict[str, Any]] = None,
         max_shard_bytes: int = 4 << 30) -> Path:
    """Write ``model`` and ``tokenizer`` as a model directory at ``path``, atomically."""
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise TypeError("save() expects a deepseek MoETransformer (a model with a ModelConfig `.config`)")
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} tokens but the model only {config.vocab_size}")

    def write_into(folder: Path) -> None:
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **config.to_dict()}
        (folder / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        save_weights(_state_for_saving(model), folder, max_shard_bytes)
        tokenizer.save(str(folder / "tokenizer.json"))
        for name, extra in (("generation.json", generation), ("compression.json", compression)):
            if extra is not None:
                (folder / name).write_text(json.dumps(extra, indent=2) + "\n")

    return write_atomically(path, write_into)


# -- reading ---------------------------------------------------------------------------------------

def read_json(path: Path) -> Any:
    """Parse a JSON file of a model directory; errors say which file and why."""
    if not path.is_file():
        raise ModelDirectoryError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelDirectoryError(f"{path} is corrupt: not valid JSON ({exc})") from exc


def load_config(path: str | Path) -> ModelConfig:
    """The :class:`ModelConfig` of a model directory."""
    file = Path(path) / "config.json"
    data = read_json(file)
    if not isinstance(data, dict):
        raise ModelDirectoryError(f"{file} is corrupt: expected a JSON object")
    fmt = data.pop("format", None if "model_type" in data else FORMAT)  # a Hugging Face config has no format
    version = data.pop("format_version", FORMAT_VERSION)
    if fmt != FORMAT:
        hint = " (a Hugging Face model? import it with `ds convert --from-hf`)" if "model_type" in data else ""
        raise ModelDirectoryError(f"{file}: format {fmt!r} is not {FORMAT!r}{hint}")
    if version > FORMAT_VERSION:
        raise ModelDirectoryError(f"{file}: format_version {version} is newer than this framework reads ({FORMAT_VERSION})")
    try:
        return ModelConfig.from_dict(data)
    except ConfigError as exc:
        raise ModelDirectoryError(f"{file}: {exc}") from exc


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a model directory (single file or sharded), read with safetensors."""
    folder = Path(path)
    if (folder / WEIGHTS_INDEX).is_file():
        index = read_json(folder / WEIGHTS_INDEX)
        files = sorted(set(index.get("weight_map", {}).values())) if isinstance(index, dict) else []
        if not files:
            raise ModelDirectoryError(f"{folder / WEIGHTS_INDEX} is corrupt: no weight_map")
    elif (folder / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        raise ModelDirectoryError(f"{folder / WEIGHTS} is missing (no weights in {folder})")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        file = folder / name
        if not file.is_file():
            raise ModelDirectoryError(f"{file} is missing (listed in {WEIGHTS_INDEX})")
        try:
            state.update(load_file(file))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelDirectoryError(f"{file} is corrupt or truncated: {exc}") from exc
    # safetensors hands out tensors at the file's byte offsets; SIMD kernels want 64-byte aligned data,
    # and reductions even round differently on misaligned data, so copy those into fresh memory.
    return {k: v if v.data_ptr() % 64 == 0 else v.clone() for k, v in state.items()}


def load_tokenizer(path: str | Path) -> Tokenizer:
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise ModelDirectoryError(f"{file} is missing")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
        raise ModelDirectoryError(f"{file} is corrupt: {exc}") from exc


def load(path: str | Path, *, device: str | torch.device = "cpu",
         dtype: Optional[torch.dtype] = None) -> tuple[MoETransformer, Tokenizer]:
    """Read a model directory: returns ``(model, tokenizer)``, the model in eval mode."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelDirectoryError(f"{folder} is not a directory")
    config = load_config(folder)
    quantization = read_quantization(folder)
    state = load_weights(folder)
    tokenizer = load_tokenizer(folder)
    model = model_from_state(config, state, str(folder), quantization=quantization)
    if quantization is not None:
        dtype = None  # integer weights keep their format; scales stay fp32
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval(), tokenizer


def read_quantization(path: str | Path) -> Optional[dict[str, Any]]:
    """The ``quantization`` entry of a directory's ``compression.json`` (None when not quantized), checked."""
    file = Path(path) / "compression.json"
    if not file.is_file():
        return None
    data = read_json(file)
    if not isinstance(data, dict):
        raise ModelDirectoryError(f"{file} is corrupt: expected a JSON object")
    quantization = data.get("quantization")
    if quantization is None:
        return None
    if not isinstance(quantization, dict) or quantization.get("scheme") not in SCHEMES:
        raise ModelDirectoryError(f"{file} is corrupt: quantization.scheme must be one of {', '.join(SCHEMES)}, "
                                  f"got {quantization!r}")
    group = quantization.get("group_size", 32)
    if not isinstance(group, int) or group < 8 or group & (group - 1):
        raise ModelDirectoryError(f"{file} is corrupt: quantization.group_size must be a power of two >= 8, got {group!r}")
    embeddings = quantization.get("embeddings", True)
    if not isinstance(embeddings, bool):
        raise ModelDirectoryError(f"{file} is corrupt: quantization.embeddings must be true or false")
    return {"scheme": quantization["scheme"], "group_size": group, "embeddings": embeddings}


def summarize_names(names: list[str], n: int = 8) -> str:
    """The first ``n`` names, and how many there are in all when that is more."""
    return ", ".join(names[:n]) + (f" … ({len(names)} in all)" if len(names) > n else "")


def model_from_state(config: ModelConfig, state: dict[str, torch.Tensor], source: str = "checkpoint",
                     error: type[Exception] = ModelDirectoryError,
                     quantization: Optional[dict[str, Any]] = None) -> MoETransformer:
    """A :class:`MoETransformer` holding exactly ``state`` (checked name by name and shape by shape), in eval mode.

    ``quantization`` ({scheme, group_size, embeddings}, from ``compression.json``) builds the quantized modules
    the state was saved from. Raises ``error`` naming ``source`` and what is missing, extra or of the wrong shape.
    """
    with torch.device("meta"):
        model = MoETransformer(config)  # no memory, no random init: every tensor comes from `state`
        if quantization is not None:
            quantize_modules(model, quantization["scheme"], group_size=quantization["group_size"],
                             embeddings=quantization["embeddings"], skeleton=True)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise error(f"{source}: weights do not match config.json"
                    + (f"; missing: {summarize_names(missing)}" if missing else "")
                    + (f"; unexpected: {summarize_names(unexpected)}" if unexpected else ""))
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape or tensor.dtype.is_floating_point != expected[name].dtype.is_floating_point:
            raise error(f"{source}: weight {name} has shape {tuple(tensor.shape)}, "
                        f"config.json implies {tuple(expected[name].shape)}")
    model.load_state_dict(state, assign=True)
    model.rope = type(model.rope)(config.head_dim, config.max_seq_len, config.rope_theta)  # not in the state
    for router in model.routers():
        router.load_accum = torch.zeros_like(router.expert_bias)
    return model.eval()


def read_extra(path: str | Path, name: str) -> Optional[dict[str, Any]]:
    """An optional JSON file of the directory (``generation.json``, ``compression.json``), or None."""
    file = Path(path) / name
    return read_json(file) if file.is_file() else None
