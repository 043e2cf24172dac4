"""The backend contract: one loaded model version that turns named input tensors into named output tensors.

A :class:`Backend` is what the server puts behind a model version: the dynamic batcher calls
:meth:`Backend.infer` with a batch of inputs (in a worker thread, under ``torch.inference_mode``),
and the HTTP/gRPC front ends call :meth:`Backend.validate_inputs` on each request first (a
``ValueError`` becomes a 400) and :meth:`Backend.metadata` for the KServe v2 model-metadata route.

Tensor specs come from the model's ``config.yaml``; their ``shape`` excludes the batch dimension when
``max_batch_size > 0`` (the metadata adds it back as -1). Load failures raise :class:`BackendError`
naming the file and the reason.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from deepseek.serve.config import ServingConfig, TensorSpec


class BackendError(RuntimeError):
    """A model version could not be loaded: the message names the file and why."""


class Backend(ABC):
    """One loaded model version (see module docs). Subclasses set ``inputs``/``outputs`` and implement
    :meth:`_infer`; ``infer`` may be called from a worker thread, one batch at a time per caller."""

    platform: str = "unknown"

    def __init__(self, name: str, version: int, path: Path, config: ServingConfig):
        self.name, self.version, self.path, self.config = name, int(version), Path(path), config
        self.inputs: list[TensorSpec] = list(config.inputs)
        self.outputs: list[TensorSpec] = list(config.outputs)
        self.preprocess = None
        if config.preprocess is not None:
            from deepseek.serve.preprocess import ImagePreprocess

            self.preprocess = ImagePreprocess(config.preprocess, self.path)
            self.inputs = [self.preprocess.model_input(s) if s.name == config.preprocess.input else s
                           for s in self.inputs]

    # -- the contract --------------------------------------------------------------------------------

    @property
    def wire_inputs(self) -> list[TensorSpec]:
        """What clients send (metadata, Triton config); ``inputs`` is what the model takes. They differ only where
        config.yaml declares a ``preprocess`` step (a BYTES input of encoded images decoded before batching)."""
        return self.inputs if self.preprocess is None else list(self.config.inputs)

    @property
    def batched(self) -> bool:
        return self.config.max_batch_size > 0

    def infer(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the model on validated ``inputs``; returns every declared output by name."""
        self.validate_inputs(inputs)
        return self._infer(inputs)

    @abstractmethod
    def _infer(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ...

    def close(self) -> None:
        """Release what the backend holds (the server calls it when a version is unloaded)."""

    def failure(self) -> Optional[str]:
        """Why this loaded backend can no longer serve (a generation engine whose model raised), else None: the
        manager then reports the version UNAVAILABLE, and a load request or a repository poll reloads it."""
        return None

    def decode_inputs(self, inputs: Mapping[str, Any]) -> Mapping[str, Any]:
        """A request's inputs as the model takes them: the config's ``preprocess`` step applied (ValueError, a 400,
        for an undecodable input); unchanged without one."""
        return inputs if self.preprocess is None else self.preprocess(inputs)

    def input_spec(self, name: str) -> Optional[TensorSpec]:
        return next((s for s in self.inputs if s.name == name), None)

    def validate_inputs(self, inputs: Mapping[str, Any]) -> None:
        """ValueError (a 400 to the client) unless ``inputs`` fit the declared inputs: every required one
        present, no unknown names, dtypes equal to the spec's, shapes equal to the spec's dims where not -1
        (with a leading batch dim when ``max_batch_size > 0``)."""
        known = {s.name for s in self.inputs}
        unknown = sorted(set(inputs) - known)
        if unknown:
            raise ValueError(f"model {self.name!r}: unknown input(s) {', '.join(unknown)}; "
                             f"expected {', '.join(s.name for s in self.inputs)}")
        missing = [s.name for s in self.inputs if not s.optional and s.name not in inputs]
        if missing:
            raise ValueError(f"model {self.name!r}: missing input(s) {', '.join(missing)}")
        for spec in self.inputs:
            if spec.name not in inputs:
                continue
            tensor = inputs[spec.name]
            if not isinstance(tensor, torch.Tensor):
                if getattr(tensor, "dtype", None) == object:  # a BYTES input (numpy object array)
                    raise ValueError(f"input {spec.name!r}: datatype must be {spec.datatype}, got BYTES (a model "
                                     f"takes encoded images only through config.yaml's preprocess step)")
                raise ValueError(f"input {spec.name!r}: expected a tensor, got {type(tensor).__name__}")
            if spec.dtype is None:
                raise ValueError(f"input {spec.name!r}: datatype {spec.datatype} is not supported by "
                                 f"the {self.platform} backend")
            if tensor.dtype != spec.dtype:
                raise ValueError(f"input {spec.name!r}: datatype must be {spec.datatype} ({spec.dtype}), "
                                 f"got {tensor.dtype}")
            expected = ([-1] if self.batched else []) + list(spec.shape)
            shape = list(tensor.shape)
            if len(shape) != len(expected) or any(e != -1 and e != s for e, s in zip(expected, shape)):
                raise ValueError(f"input {spec.name!r}: shape {shape} does not match {expected} (-1: any size"
                                 f"{'; the first dim is the batch' if self.batched else ''})")

    def metadata(self) -> dict[str, Any]:
        """The KServe v2 model metadata: ``{name, versions, platform, inputs, outputs}``."""
        batch = [-1] if self.batched else []

        def tensors(specs: list[TensorSpec]) -> list[dict[str, Any]]:
            return [{"name": s.name, "datatype": s.datatype, "shape": batch + list(s.shape)} for s in specs]

        return {"name": self.name, "versions": [str(self.version)], "platform": self.platform,
                "inputs": tensors(self.wire_inputs), "outputs": tensors(self.outputs)}

    def batcher_kwargs(self) -> dict[str, Any]:
        """``config.batcher_kwargs()`` with the pad values of the backend's (possibly derived) inputs."""
        kwargs = self.config.batcher_kwargs()
        if kwargs.get("combine", True):
            kwargs["pad_values"] = {s.name: s.pad_value for s in self.inputs if s.pad_value is not None}
        return kwargs

    # -- helpers for subclasses ----------------------------------------------------------------------

    def map_outputs(self, result: Any) -> dict[str, torch.Tensor]:
        """A model's return value (a tensor, a tuple/list in declared order, or a dict) by output name."""
        names = [s.name for s in self.outputs]
        if isinstance(result, torch.Tensor):
            result = (result,)
        if isinstance(result, Mapping):
            missing = [n for n in names if n not in result]
            if missing:
                raise RuntimeError(f"model {self.name!r} returned {sorted(result)}; missing output(s) "
                                   f"{', '.join(missing)}")
            return {n: result[n] for n in names}
        if isinstance(result, (tuple, list)):
            if len(result) != len(names):
                raise RuntimeError(f"model {self.name!r} returned {len(result)} outputs; "
                                   f"{len(names)} declared ({', '.join(names)})")
            return dict(zip(names, result))
        raise RuntimeError(f"model {self.name!r} returned {type(result).__name__}; expected a tensor, "
                           f"a tuple of tensors or a dict")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, version={self.version}, path={str(self.path)!r})"
