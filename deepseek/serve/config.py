"""A served model's ``config.yaml``: backend, tensor signature, batching, instances, version policy.

    backend: onnx            # deepseek (a model directory) | torch | onnx | embedding (sentence-transformers)
                             # | retrieval (a knowledge index)
    max_batch_size: 64       # 0: the model takes no batch dimension; > 0: dim 0 is the batch, implicit in shapes
    inputs:  [{name: x, datatype: FP32, shape: [32]}]          # -1 marks a dynamic dimension
    outputs: [{name: y, datatype: FP32, shape: [10]}]
    dynamic_batching: {max_queue_delay_ms: 5, max_queue_size: 1024}
    instances: 1             # executors running batches in parallel
    version_policy: {latest: 1}   # or {all: true} or {specific: [1, 3]}
    routing: {policy: weighted, weights: {1: 95, 2: 5}}   # which version a request without one gets

An ``embedding`` model (``POST /v1/embeddings``) is a sentence-transformers directory as its version folder, or
``parameters: {model: all-MiniLM-L6-v2}`` (the packaged model; or a directory, relative to this file's folder);
its tensors are derived, and it batches dynamically unless told otherwise (``max_batch_size`` 64,
``dynamic_batching`` defaults). A ``retrieval`` model (``POST /v1/retrieve``) is a knowledge index
(``parameters: {index: PATH, mode: hybrid, k: 5}``, or the version folder itself), served like an embedding model
of the index's own embedding model (:mod:`deepseek.serve.backends.retrieval_backend`).

Datatypes are the KServe v2 names. Parsing goes through :func:`deepseek.config.from_dict`, so an unknown
key is an error listing the valid ones; :func:`load_serving_config` names the file in every error.
"""

from __future__ import annotations

import re

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import yaml

from deepseek.config import ConfigError, from_dict

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # LoRA adapter names: the OpenAI model "<model>:<name>"

DATATYPE_TO_TORCH: dict[str, Optional[torch.dtype]] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "UINT16": torch.uint16,
    "UINT32": torch.uint32,
    "UINT64": torch.uint64,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "FP32": torch.float32,
    "FP64": torch.float64,
    "BF16": torch.bfloat16,
    "BYTES": None,  # strings / raw bytes: no tensor dtype
}
DATATYPES = tuple(DATATYPE_TO_TORCH)
BACKENDS = ("deepseek", "torch", "onnx", "embedding", "retrieval")
EMBEDDING_MAX_BATCH_SIZE = 64  # an embedding model's default: concurrent requests share one encode call
BATCHED_BY_DEFAULT = ("embedding", "retrieval")  # both embed texts behind the dynamic batcher


def torch_dtype(datatype: str) -> Optional[torch.dtype]:
    """The torch dtype of a KServe v2 datatype name (None for BYTES); ConfigError for an unknown name."""
    if datatype not in DATATYPE_TO_TORCH:
        raise ConfigError(f"datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
    return DATATYPE_TO_TORCH[datatype]


@dataclass
class TensorSpec:
    """One input or output: ``shape`` excludes the batch dimension when ``max_batch_size > 0``; -1 is dynamic."""

    name: str
    datatype: str
    shape: list[int]
    optional: bool = False
    pad_value: Optional[float] = None  # ragged inputs are padded with this when batched

    def __post_init__(self):
        if not self.name:
            raise ConfigError("tensor name must not be empty")
        if self.datatype not in DATATYPE_TO_TORCH:
            raise ConfigError(f"tensor {self.name!r}: datatype {self.datatype!r} is not one of {', '.join(DATATYPES)}")
        bad = [d for d in self.shape if d != -1 and d < 1]
        if bad:
            raise ConfigError(f"tensor {self.name!r}: shape {self.shape} has invalid dims {bad} "
                              f"(each dim is >= 1, or -1 for a dynamic one)")

    @property
    def dtype(self) -> Optional[torch.dtype]:
        return DATATYPE_TO_TORCH[self.datatype]


@dataclass
class DynamicBatchingConfig:
    """Triton's dynamic batcher settings, in milliseconds (see docs/serving.md)."""

    max_queue_delay_ms: float = 5.0  # the longest a batch waits to fill (skipped under light load)
    preferred_batch_sizes: list[int] = field(default_factory=list)
    max_queue_size: int = 1024  # a full queue rejects at once (429 / RESOURCE_EXHAUSTED)
    timeout_ms: Optional[float] = None  # per-request deadline; a request's own `timeout` may only shorten it
    timeout_action: Literal["reject", "delay"] = "reject"  # past the deadline: 504, or wait behind the others
    priority_levels: int = 0  # > 1: requests carry `priority` 1 (highest) .. priority_levels
    default_priority_level: Optional[int] = None  # for requests without one (default: the middle level)

    def __post_init__(self):
        if self.max_queue_delay_ms < 0:
            raise ConfigError(f"max_queue_delay_ms must be >= 0, got {self.max_queue_delay_ms}")
        if self.max_queue_size < 1:
            raise ConfigError(f"max_queue_size must be >= 1, got {self.max_queue_size}")
        if any(p < 1 for p in self.preferred_batch_sizes):
            raise ConfigError(f"preferred_batch_sizes must be >= 1, got {self.preferred_batch_sizes}")
        if self.timeout_ms is not None and self.timeout_ms <= 0:
            raise ConfigError(f"timeout_ms must be > 0, got {self.timeout_ms}")
        if self.priority_levels < 0:
            raise ConfigError(f"priority_levels must be >= 0, got {self.priority_levels}")
        if self.default_priority_level is not None and \
                not 1 <= self.default_priority_level <= max(self.priority_levels, 1):
            raise ConfigError(f"default_priority_level must lie in 1..priority_levels ({self.priority_levels}), "
                              f"got {self.default_priority_level}")


@dataclass
class GenerationConfig:
    """Text generation of a language model (``backend: deepseek``): the continuous batching engine's limits.

    ``max_running`` sequences decode together; each engine iteration handles at most
    ``max_batched_tokens`` tokens (one per running sequence plus a prompt chunk of up to
    ``prefill_chunk``); ``max_queue`` requests may wait (beyond: 429); ``max_len`` tokens per sequence
    (prompt + completion; default the model's ``max_seq_len``) sizes the preallocated KV cache.
    """

    max_running: int = 16
    max_batched_tokens: int = 512
    prefill_chunk: int = 256
    max_queue: int = 256
    max_len: Optional[int] = None

    def __post_init__(self):
        if self.max_running < 1 or self.prefill_chunk < 1 or self.max_queue < 0:
            raise ConfigError("generation: max_running and prefill_chunk must be >= 1, max_queue >= 0")
        if self.max_batched_tokens <= self.max_running:
            raise ConfigError(f"generation.max_batched_tokens ({self.max_batched_tokens}) must exceed "
                              f"max_running ({self.max_running})")
        if self.max_len is not None and self.max_len < 2:
            raise ConfigError(f"generation.max_len must be >= 2, got {self.max_len}")


@dataclass
class VersionPolicy:
    """Which version folders to serve: ``latest: N``, ``all: true`` or ``specific: [...]`` (exactly one).

    With nothing set the policy is ``latest: 1``. A ``specific`` version that is not on disk is dropped
    by :meth:`select` (the repository marks the model unavailable only when nothing at all is selected).
    """

    latest: Optional[int] = None
    all: bool = False
    specific: list[int] = field(default_factory=list)

    def __post_init__(self):
        kinds = [k for k, on in (("latest", self.latest is not None), ("all", self.all), ("specific", bool(self.specific)))
                 if on]
        if len(kinds) > 1:
            raise ConfigError(f"version_policy: set exactly one of latest, all, specific (got {', '.join(kinds)})")
        if self.latest is not None and self.latest < 1:
            raise ConfigError(f"version_policy.latest must be >= 1, got {self.latest}")
        if any(v < 1 for v in self.specific):
            raise ConfigError(f"version_policy.specific versions must be >= 1, got {self.specific}")

    @property
    def kind(self) -> str:
        return "all" if self.all else "specific" if self.specific else "latest"

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve out of ``available``, sorted ascending."""
        versions = sorted(set(available))
        if self.all:
            return versions
        if self.specific:
            wanted = set(self.specific)
            return [v for v in versions if v in wanted]
        n = 1 if self.latest is None else self.latest
        return versions[-n:]


@dataclass
class PreprocessConfig:
    """A decoding step before the batcher: the BYTES input ``input`` (one encoded image per row, e.g. PNG bytes
    as Triton's image client sends them) becomes the model's FP32 input ``output`` [B, C, H, W] through the
    :class:`deepseek.vision.DeepseekImageProcessor` saved in ``processor`` (a preprocessor_config.json, relative
    to the version folder, else the model folder). See :mod:`deepseek.serve.preprocess`."""

    processor: str
    input: str = "image"
    output: str = "pixel_values"
    kind: Literal["image"] = "image"

    def __post_init__(self):
        if not self.processor:
            raise ConfigError("preprocess.processor must name a preprocessor_config.json")
        if not self.input or not self.output:
            raise ConfigError("preprocess.input and preprocess.output must not be empty")


@dataclass
class ServingConfig:
    backend: Literal["deepseek", "torch", "onnx", "embedding", "retrieval"]
    max_batch_size: int = 0
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    dynamic_batching: Optional[DynamicBatchingConfig] = None
    instances: int = 1
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    parameters: dict[str, Any] = field(default_factory=dict)  # backend-specific (e.g. a torch entry point)
    routing: dict[str, Any] = field(default_factory=dict)  # a routing policy (deepseek.serve.routing.parse_policy)
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # language models only
    # deepseek models: auto = the dtype that decodes fastest on this device (deepseek.hardware), fp32 or bf16;
    # embedding and retrieval models: the dtype whose token-block products are fastest here
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # deepseek models: LoRA adapters served per row of one batch, {name: adapter directory (PEFT's format or
    # ours)}; a relative path is read from this file's folder. Requests pick one with the OpenAI model
    # "<model>:<adapter>"; the management API adds and removes adapters at run time.
    adapters: dict[str, str] = field(default_factory=dict)
    # torch/onnx models: decode a BYTES input of encoded images into the model's float input before batching
    preprocess: Optional[PreprocessConfig] = None

    def __post_init__(self):
        if self.max_batch_size < 0:
            raise ConfigError(f"max_batch_size must be >= 0, got {self.max_batch_size}")
        if self.backend in BATCHED_BY_DEFAULT:  # texts are embedded batched unless the config says how
            self.max_batch_size = self.max_batch_size or EMBEDDING_MAX_BATCH_SIZE
            if self.dynamic_batching is None:
                self.dynamic_batching = DynamicBatchingConfig()
        if self.instances < 1:
            raise ConfigError(f"instances must be >= 1, got {self.instances}")
        for kind, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            names = [s.name for s in specs]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ConfigError(f"{kind}: duplicate names {', '.join(dup)}")
        if self.backend in ("onnx", "torch") and not (self.inputs and self.outputs):
            raise ConfigError(f"backend {self.backend!r} needs inputs and outputs declared")
        for name, path in self.adapters.items():
            if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
                raise ConfigError(f"adapters: name {name!r} must be letters, digits, '.', '_' or '-'")
            if not isinstance(path, str) or not path:
                raise ConfigError(f"adapters: {name!r} needs a directory path, got {path!r}")
        if self.adapters and self.backend != "deepseek":
            raise ConfigError(f"adapters are served by the deepseek backend only, not {self.backend!r}")
        if self.preprocess is not None:
            spec = next((t for t in self.inputs if t.name == self.preprocess.input), None)
            if spec is None or spec.datatype != "BYTES":
                raise ConfigError(f"preprocess.input {self.preprocess.input!r} must be a declared BYTES input")
            if self.backend not in ("torch", "onnx"):
                raise ConfigError(f"preprocess is for the torch and onnx backends, not {self.backend!r}")
            if self.max_batch_size < 1:
                raise ConfigError("preprocess needs max_batch_size >= 1 (one encoded image per row)")
        if self.dynamic_batching is not None:
            if self.max_batch_size < 1:
                raise ConfigError("dynamic_batching needs max_batch_size >= 1")
            too_big = [p for p in self.dynamic_batching.preferred_batch_sizes if p > self.max_batch_size]
            if too_big:
                raise ConfigError(f"dynamic_batching.preferred_batch_sizes {too_big} exceed "
                                  f"max_batch_size {self.max_batch_size}")

    def batcher_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`deepseek.serve.batching.DynamicBatcher`.

        Without a ``dynamic_batching`` section every request runs alone (``combine=False``) but still goes
        through the bounded queue, so limits, deadlines and statistics are the same for every model."""
        db = self.dynamic_batching
        if db is None:
            return {"max_batch_size": 1, "timeout_ms": 0.0, "max_queue_size": DynamicBatchingConfig.max_queue_size,
                    "instances": self.instances, "combine": False}
        return {"max_batch_size": self.max_batch_size, "timeout_ms": db.max_queue_delay_ms,
                "preferred_batch_sizes": list(db.preferred_batch_sizes), "max_queue_size": db.max_queue_size,
                "default_timeout_ms": db.timeout_ms, "instances": self.instances,
                "priority_levels": db.priority_levels, "default_priority": db.default_priority_level,
                "timeout_action": db.timeout_action,
                "pad_values": {s.name: s.pad_value for s in self.inputs if s.pad_value is not None}}


def parse_serving_config(data: Any) -> ServingConfig:
    """A :class:`ServingConfig` from a parsed YAML/JSON mapping."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping, got {type(data).__name__}")
    if "backend" not in data:
        raise ConfigError(f"missing key backend (one of {', '.join(BACKENDS)})")
    return from_dict(ServingConfig, data)


def load_serving_config(path: str | Path) -> ServingConfig:
    """Read a model's ``config.yaml``; every ConfigError names the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    try:
        return parse_serving_config({} if data is None else data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
