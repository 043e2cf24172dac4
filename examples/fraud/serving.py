"""From trained models to a ``ds serve`` model repository (ONNX, dynamic batching), and the client side.

    repository/
      fraud_teacher/config.yaml   1/model.onnx   the deep teacher, fp32
      fraud_student/config.yaml   1/model.onnx   the distilled student, INT8 (onnxruntime dynamic quantization)

Each model takes ``transactions`` FP32 [batch, W, F] (a window, oldest first, zero rows as left padding, the
last feature the present flag) and answers ``fraud_probability`` FP32 [batch, 1]. The export is
:func:`deepseek.export.export_onnx` (validated against eager torch) with ``quantize_int8=True`` for the student:
its LSTM and Linear weights become int8, activations are quantized per call.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from deepseek.export.onnx import export_onnx, serving_config

from fraud.model import FraudProbability

DYNAMIC_BATCHING = {"max_queue_delay_ms": 2, "max_queue_size": 1024}


def export_model(model: torch.nn.Module, window: int, n_features: int, out_dir: Path, *, int8: bool,
                 validate: bool = True) -> dict:
    """Export ``model`` (as :class:`FraudProbability`) to ``out_dir/model.onnx`` (and ``model.int8.onnx``);
    ``validate`` compares the fp32 graph with eager torch on three batch sizes."""
    example = torch.zeros(2, window, n_features)
    example[..., -1] = 1.0
    report = export_onnx(FraudProbability(model).eval(), Path(out_dir) / "model.onnx", example_inputs=(example,),
                         input_names=["transactions"], output_names=["fraud_probability"], quantize_int8=int8,
                         validate=validate)
    return {"report": report, "fp32_bytes": report.file_bytes, "int8_bytes": report.int8["file_bytes"] if int8 else None}


def add_to_repository(repo: Path, name: str, onnx_file: Path, report, max_batch_size: int = 64) -> Path:
    """``repo/name/1/model.onnx`` + ``config.yaml`` (onnx backend, dynamic batching)."""
    version = Path(repo) / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_file, version / "model.onnx")
    config = serving_config(report, max_batch_size=max_batch_size) | {"dynamic_batching": DYNAMIC_BATCHING}
    (Path(repo) / name / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return version


def onnx_scores(onnx_file: Path, x_BWF: torch.Tensor, chunk: int = 4096) -> np.ndarray:
    """Fraud probabilities from an ONNX file with onnxruntime (what the server computes), [B]."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    out = [session.run(None, {"transactions": x_BWF[i:i + chunk].numpy()})[0][:, 0] for i in range(0, len(x_BWF), chunk)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def infer_body(x_BWF: torch.Tensor) -> dict:
    """A KServe v2 JSON request for windows ``x_BWF``."""
    return {"inputs": [{"name": "transactions", "shape": list(x_BWF.shape), "datatype": "FP32",
                        "data": x_BWF.reshape(-1).tolist()}]}


def fraud_probabilities(answer: dict) -> list[float]:
    (output,) = [o for o in answer["outputs"] if o["name"] == "fraud_probability"]
    return list(output["data"])
