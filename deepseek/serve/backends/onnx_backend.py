"""The ``onnx`` backend: ``model.onnx`` in the version folder, run by onnxruntime on the CPU.

Threads: ``parameters.threads`` in config.yaml, else ``torch.get_num_threads()`` (intra-op; inter-op 1).
Declared inputs and outputs must exist in the session; tensors cross as numpy arrays (no copy on the way back).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from deepseek.serve.backends.base import Backend, BackendError
from deepseek.serve.config import ServingConfig

MODEL_FILE = "model.onnx"


class OnnxBackend(Backend):
    platform = "onnxruntime_onnx"

    def __init__(self, name: str, version: int, path: Path, config: ServingConfig):
        super().__init__(name, version, path, config)
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendError(f"model {name!r}: the onnx backend needs onnxruntime "
                               f"(pip install 'deepseek-framework[serve]')") from exc
        file = self.path / MODEL_FILE
        if not file.is_file():
            raise BackendError(f"{file} is missing")
        options = ort.SessionOptions()
        threads = (config.parameters or {}).get("threads")
        options.intra_op_num_threads = int(threads) if threads else torch.get_num_threads()
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
            raise BackendError(f"{file}: cannot load the ONNX model: {exc}") from exc
        session_inputs = [i.name for i in self.session.get_inputs()]
        session_outputs = [o.name for o in self.session.get_outputs()]
        absent = [s.name for s in self.inputs if s.name not in session_inputs]
        if absent:
            raise BackendError(f"{file}: declared input(s) {', '.join(absent)} not in the model; "
                               f"its inputs are {', '.join(session_inputs)}")
        undeclared = [n for n in session_inputs if n not in {s.name for s in self.inputs}]
        if undeclared:
            raise BackendError(f"{file}: model input(s) {', '.join(undeclared)} are not declared in config.yaml")
        absent = [s.name for s in self.outputs if s.name not in session_outputs]
        if absent:
            raise BackendError(f"{file}: declared output(s) {', '.join(absent)} not in the model; "
                               f"its outputs are {', '.join(session_outputs)}")

    def _infer(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feed = {name: np.ascontiguousarray(t.detach().cpu().numpy()) for name, t in inputs.items()}
        names = [s.name for s in self.outputs]
        results = self.session.run(names, feed)
        return {name: torch.from_numpy(np.asarray(r)) for name, r in zip(names, results)}

    def close(self) -> None:
        self.session = None
