"""The ``torch`` backend: one of, in the version folder (first match wins)::

    parameters: {entry_point: "pkg.module:factory"}   # config.yaml: factory() -> nn.Module, imported from sys.path
                 weights: model.safetensors            #   optional, in the version folder, loaded strictly
    model.pt2                                          # a torch.export program (torch.export.load)
    model.pt                                           # a TorchScript archive (torch.jit.load)

An entry point's module may define ``check_inputs(inputs)``: it runs on each request before it is queued, and
its ``ValueError`` is the client's 400 (e.g. an id outside the model's table), so one bad request never
fails the others of its batch. Inputs are passed positionally in declared order; the model returns a tensor, a tuple (declared order) or
a dict keyed by output name. Nothing is unpickled (no ``torch.load``). A TorchScript archive and an entry
point both run code chosen by the model's owner: serve only a repository you trust, as the server's
operator does for their own models.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Mapping

import torch

from deepseek.serve.backends.base import Backend, BackendError
from deepseek.serve.config import ServingConfig

EXPORTED, TORCHSCRIPT = "model.pt2", "model.pt"


class TorchBackend(Backend):
    platform = "pytorch"

    def __init__(self, name: str, version: int, path: Path, config: ServingConfig):
        super().__init__(name, version, path, config)
        params = config.parameters or {}
        if params.get("entry_point"):
            self.module = self._from_entry_point(str(params["entry_point"]), params.get("weights"))
            self.platform = "pytorch_python"
        elif (self.path / EXPORTED).is_file():
            file = self.path / EXPORTED
            try:
                self.module = torch.export.load(str(file)).module()
            except Exception as exc:  # zip / schema / deserialization errors of many kinds
                raise BackendError(f"{file}: cannot load the torch.export program: {exc}") from exc
            self.platform = "pytorch_export"
        elif (self.path / TORCHSCRIPT).is_file():
            file = self.path / TORCHSCRIPT
            try:
                self.module = torch.jit.load(str(file), map_location="cpu").eval()
            except Exception as exc:
                raise BackendError(f"{file}: cannot load the TorchScript archive: {exc}") from exc
            self.platform = "pytorch_torchscript"
        else:
            raise BackendError(f"{self.path}: no {EXPORTED} or {TORCHSCRIPT}, and config.yaml sets no "
                               f"parameters.entry_point")

    def _from_entry_point(self, entry_point: str, weights) -> torch.nn.Module:
        module_name, sep, attr = entry_point.partition(":")
        if not sep or not module_name or not attr:
            raise BackendError(f"model {self.name!r}: entry_point {entry_point!r} must be 'package.module:factory'")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise BackendError(f"model {self.name!r}: cannot import entry_point {entry_point!r}: {exc}") from exc
        try:
            module = factory()
        except Exception as exc:
            raise BackendError(f"model {self.name!r}: entry_point {entry_point!r} failed: {exc}") from exc
        if not isinstance(module, torch.nn.Module):
            raise BackendError(f"model {self.name!r}: entry_point {entry_point!r} returned "
                               f"{type(module).__name__}, not a torch.nn.Module")
        if weights:
            file = (self.path / str(weights)).resolve()
            if not file.is_relative_to(self.path.resolve()):
                raise BackendError(f"{file}: parameters.weights must lie inside the version folder {self.path}")
            if not file.is_file():
                raise BackendError(f"{file} is missing (parameters.weights)")
            from safetensors import SafetensorError
            from safetensors.torch import load_file
            try:
                state = load_file(str(file))
            except (SafetensorError, OSError, ValueError) as exc:
                raise BackendError(f"{file} is corrupt: {exc}") from exc
            try:
                module.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise BackendError(f"{file} does not fit the entry point's module: {exc}") from exc
        return module.eval()

    def validate_inputs(self, inputs: Mapping[str, torch.Tensor]) -> None:
        super().validate_inputs(inputs)
        check = getattr(self.module, "check_inputs", None)
        if callable(check):
            check(inputs)

    def _infer(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        args = [inputs[s.name] if s.name in inputs else None for s in self.inputs]
        while args and args[-1] is None:  # trailing optional inputs left out: let the model's defaults apply
            args.pop()
        return self.map_outputs(self.module(*args))

    def close(self) -> None:
        self.module = None
