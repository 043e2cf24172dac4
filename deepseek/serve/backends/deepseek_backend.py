"""The ``deepseek`` backend: a model directory (``deepseek.models.directory``) served as a tensor model.

Tensor API (derived when ``config.yaml`` declares no inputs/outputs; shapes shown with the batch dim)::

    input_ids       INT64 [-1, -1]   token ids; ragged requests are right-padded with the tokenizer's pad id
    attention_mask  INT64 [-1, -1]   optional; 1 = token, 0 = padding (padded with 0)
    logits          FP32  [-1, -1, vocab]

Declared inputs/outputs must use these names and datatypes. ``model`` and ``tokenizer`` are exposed for
the text-generation endpoints.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Mapping, Optional

import torch

from deepseek.config import ConfigError
from deepseek.data.tokenizer import PAD
from deepseek.generate.continuous import ContinuousBatchingEngine
from deepseek.hardware import resolve_precision
from deepseek.models.adapters import AdapterError, load_adapters
from deepseek.models.directory import ModelDirectoryError, load
from deepseek.serve.backends.base import Backend, BackendError
from deepseek.serve.config import ServingConfig, TensorSpec

INPUT_IDS, ATTENTION_MASK, LOGITS = "input_ids", "attention_mask", "logits"
_DATATYPES = {INPUT_IDS: "INT64", ATTENTION_MASK: "INT64", LOGITS: "FP32"}


class DeepSeekBackend(Backend):
    platform = "deepseek"

    def __init__(self, name: str, version: int, path: Path, config: ServingConfig):
        super().__init__(name, version, path, config)
        # Serving is mostly decoding (one row per sequence per step): the precision that is fast for that here.
        self.precision = resolve_precision(config.precision, "cpu", workload="decode")
        try:
            self.model, self.tokenizer = load(self.path, dtype=self.precision.autocast_dtype)
        except (ModelDirectoryError, ConfigError, OSError) as exc:
            raise BackendError(f"model {name!r} version {version}: cannot load model directory: {exc}") from exc
        self.model.eval()
        self.adapters: tuple[str, ...] = ()
        if config.adapters:
            root = self.path.parent  # config.yaml's folder
            try:
                self.adapters = tuple(load_adapters(self.model, {n: root / p for n, p in config.adapters.items()}))
            except AdapterError as exc:
                raise BackendError(f"model {name!r} version {version}: {exc}") from exc
        self._engine: Optional[ContinuousBatchingEngine] = None
        self._engine_lock = threading.Lock()
        self.vocab_size = self.model.config.vocab_size
        pad = self.tokenizer.token_to_id(PAD)
        self.pad_id = int(pad) if pad is not None else 0
        seq = [-1] if self.batched else [-1, -1]  # the batch dim is implicit when max_batch_size > 0
        if not self.inputs:
            self.inputs = [TensorSpec(INPUT_IDS, "INT64", list(seq), pad_value=self.pad_id),
                           TensorSpec(ATTENTION_MASK, "INT64", list(seq), optional=True, pad_value=0)]
        if not self.outputs:
            self.outputs = [TensorSpec(LOGITS, "FP32", seq + [self.vocab_size])]
        self._check_declared()

    def _check_declared(self) -> None:
        where = f"{self.path.parent / 'config.yaml'}"
        for kind, specs, allowed in (("inputs", self.inputs, (INPUT_IDS, ATTENTION_MASK)),
                                     ("outputs", self.outputs, (LOGITS,))):
            for spec in specs:
                if spec.name not in allowed:
                    raise BackendError(f"{where}: a deepseek model has {kind} {', '.join(allowed)}; "
                                       f"got {spec.name!r}")
                if spec.datatype != _DATATYPES[spec.name]:
                    raise BackendError(f"{where}: {spec.name} must be {_DATATYPES[spec.name]}, got {spec.datatype}")
        ids = self.input_spec(INPUT_IDS)
        if ids is None or ids.optional:
            raise BackendError(f"{where}: a deepseek model needs the required input {INPUT_IDS}")
        if not self.outputs:
            raise BackendError(f"{where}: a deepseek model needs the output {LOGITS}")

    def _infer(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = inputs[INPUT_IDS]
        mask = inputs.get(ATTENTION_MASK)
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"{ATTENTION_MASK} shape {list(mask.shape)} must equal {INPUT_IDS} shape "
                             f"{list(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"{INPUT_IDS} must lie in 0..{self.vocab_size - 1}")
        device = next(self.model.parameters()).device
        logits = self.model(ids.to(device), attention_mask=None if mask is None else mask.to(device))
        return {LOGITS: logits.float().cpu()}

    def engine(self) -> ContinuousBatchingEngine:
        """The text-generation engine of this version, started on first use (the OpenAI and generate routes)."""
        with self._engine_lock:
            if self._engine is None:
                if self.model is None:
                    raise BackendError(f"model {self.name!r} version {self.version} is closed")
                g = self.config.generation
                self._engine = ContinuousBatchingEngine(
                    self.model, self.tokenizer, max_running=g.max_running, max_batched_tokens=g.max_batched_tokens,
                    prefill_chunk=g.prefill_chunk, max_queue=g.max_queue, max_len=g.max_len,
                    name=f"{self.name}-v{self.version}").start()
            return self._engine

    @property
    def engine_started(self) -> Optional[ContinuousBatchingEngine]:
        return self._engine

    def failure(self) -> Optional[str]:
        engine = self._engine
        return None if engine is None or engine.failure is None else f"generation engine failed: {engine.failure}"

    def close(self) -> None:
        """Finish every accepted generation request, then release the model (blocking: call off the loop)."""
        with self._engine_lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            engine.stop(drain=True)
        self.model = None
