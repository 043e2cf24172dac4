"""The ``deepseek`` backend: a model directory (``deepseek.models.directory``) served as a tensor model.

Tensor API (derived when ``config.yaml`` declares no inputs/outputs; shapes shown with the batch dim)::

    input_ids       INT64 [-1, -1]   token ids; ragged requests are right-padded with the tokenizer's pad id
    attention_mask  INT64 [-1, -1]   optional; 1 = token, 0 = padding (padded with 0)
    logits          FP32  [-1, -1, vocab]

Declared inputs/outputs must use these names and datatypes. ``model`` and ``tokenizer`` are exposed for
the text-generation endpoints.

LoRA adapters (either format, :mod:`deepseek.models.adapters`) are served per row: those ``config.yaml`` lists are
loaded with the model; :meth:`DeepSeekBackend.load_adapter` / :meth:`~DeepSeekBackend.unload_adapter` change the
set at run time (the management API). The model's :class:`~deepseek.nn.multi_lora.MultiLoRALinear` layers hold
adapter *slots*: a change rebuilds them from the slots' weights (read once, kept here) and swaps them in between
two iterations of the generation engine, so no forward sees half a change. Rebuilding rather than growing the
stacked buffers in place keeps MultiLoRALinear simple (fixed shapes, one rank) at the price of copying every
adapter's A and B per change: small next to a model, and changes are rare. A request keeps its slot index for its
whole life, so an unloaded adapter's slot is refused to new requests at once but emptied only once no queued or
running request uses it (the next change frees it); a load reuses a free slot before appending one.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Mapping, Optional, TypeVar

import torch

from deepseek.config import ConfigError
from deepseek.data.tokenizer import PAD
from deepseek.generate.continuous import ContinuousBatchingEngine
from deepseek.hardware import resolve_precision
from deepseek.models.adapters import AdapterError, ServedAdapter, install_adapters, read_served_adapter
from deepseek.models.directory import ModelDirectoryError, load
from deepseek.serve.backends.base import Backend, BackendError
from deepseek.serve.config import ADAPTER_NAME, ServingConfig, TensorSpec

INPUT_IDS, ATTENTION_MASK, LOGITS = "input_ids", "attention_mask", "logits"
_DATATYPES = {INPUT_IDS: "INT64", ATTENTION_MASK: "INT64", LOGITS: "FP32"}
T = TypeVar("T")


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
        self._slots: list[Optional[ServedAdapter]] = []  # index = the rows' adapter id in MultiLoRALinear
        self._served: dict[str, int] = {}  # adapter name -> slot, for new requests
        if config.adapters:
            root = self.path.parent  # config.yaml's folder
            try:
                self._slots = [read_served_adapter(self.model, n, root / p) for n, p in config.adapters.items()]
            except AdapterError as exc:
                raise BackendError(f"model {name!r} version {version}: {exc}") from exc
            install_adapters(self.model, self._slots)
            self._served = {slot.name: i for i, slot in enumerate(self._slots)}
        self._engine: Optional[ContinuousBatchingEngine] = None
        self._engine_lock = threading.Lock()
        self._adapters_lock = threading.Lock()  # one adapter change at a time
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

    @property
    def adapters(self) -> tuple[str, ...]:
        """The adapters new requests may pick, in slot order."""
        return tuple(sorted(self._served, key=self._served.get))

    # -- adapters at run time ----------------------------------------------------------------------------------

    def read_adapter(self, name: str, directory: str | Path) -> ServedAdapter:
        """Read and check an adapter directory against this version's model, changing nothing (AdapterError)."""
        if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
            raise AdapterError(f"adapter name {name!r} must be letters, digits, '.', '_' or '-'")
        if self.model is None:
            raise BackendError(f"model {self.name!r} version {self.version} is closed")
        return read_served_adapter(self.model, name, directory)

    def load_adapter(self, name: str, directory: str | Path) -> None:
        """Serve the adapter in ``directory`` as ``name`` from the next engine iteration on (a loaded ``name`` is
        replaced: its running requests finish on the old weights). AdapterError, and nothing changed, when the
        directory is refused."""
        self.install_adapter(self.read_adapter(name, directory))

    def install_adapter(self, adapter: ServedAdapter) -> None:
        """Serve an adapter :meth:`read_adapter` read (see :meth:`load_adapter`)."""
        def change(in_use: set[int]) -> None:
            slots = self._free_slots(in_use)
            free = [i for i, slot in enumerate(slots) if slot is None]
            index = free[0] if free else len(slots)
            slots[index:index + 1] = [adapter]
            self._swap_in(slots, {**self._served, adapter.name: index})

        self._change_adapters(change)

    def unload_adapter(self, name: str) -> None:
        """Stop serving adapter ``name`` to new requests (KeyError when it is not served); its queued and running
        requests finish with it."""
        def change(in_use: set[int]) -> None:
            if name not in self._served:
                raise KeyError(f"model {self.name!r} version {self.version} has no adapter {name!r} (it serves: "
                               f"{', '.join(self.adapters) or 'none'})")
            served = {n: i for n, i in self._served.items() if n != name}
            self._served = served
            self._swap_in(self._free_slots(in_use), served)

        self._change_adapters(change)

    def _free_slots(self, in_use: set[int]) -> list[Optional[ServedAdapter]]:
        """The slots with those that no name serves and no live request uses emptied, trailing empties dropped."""
        keep = set(self._served.values()) | in_use
        slots = [slot if i in keep else None for i, slot in enumerate(self._slots)]
        while slots and slots[-1] is None:
            slots.pop()
        return slots

    def _swap_in(self, slots: list[Optional[ServedAdapter]], served: dict[str, int]) -> None:
        install_adapters(self.model, slots)
        self._slots, self._served = slots, served
        if self._engine is not None:
            self._engine.adapters = dict(served)

    def _change_adapters(self, change: Callable[[set[int]], T]) -> T:
        """Run ``change(slots in use)`` between engine iterations (at once when no engine runs yet)."""
        with self._adapters_lock:
            with self._engine_lock:  # no engine starts meanwhile
                engine = self._engine
                if engine is None:
                    if self.model is None:
                        raise BackendError(f"model {self.name!r} version {self.version} is closed")
                    return change(set())
            return engine.between_steps(change)

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
                engine = ContinuousBatchingEngine(
                    self.model, self.tokenizer, max_running=g.max_running, max_batched_tokens=g.max_batched_tokens,
                    prefill_chunk=g.prefill_chunk, max_queue=g.max_queue, max_len=g.max_len,
                    name=f"{self.name}-v{self.version}")
                engine.adapters = dict(self._served)  # the model's layers may also hold unloaded adapters' slots
                self._engine = engine.start()
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
