"""Export: ONNX graphs of language models (with or without a KV cache) and of any nn.Module, validated with
onnxruntime, optionally int8-quantized; static int8 (pt2e) models as QDQ int8 graphs. See docs/export.md."""

from deepseek.export.onnx import ExportError, ExportReport, export_onnx, serving_config, strip_metadata
from deepseek.export.static_int8_onnx import export_static_int8_onnx

__all__ = ["ExportError", "ExportReport", "export_onnx", "export_static_int8_onnx", "serving_config",
           "strip_metadata"]
