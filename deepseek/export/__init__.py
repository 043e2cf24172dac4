"""Export: ONNX graphs of language models (with or without a KV cache) and of any nn.Module, validated with
onnxruntime, optionally int8-quantized. See docs/export.md."""

from deepseek.export.onnx import ExportError, ExportReport, export_onnx, serving_config

__all__ = ["ExportError", "ExportReport", "export_onnx", "serving_config"]
