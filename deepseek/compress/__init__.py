"""Compression: quantization (PTQ and QAT), pruning, distillation, and the report comparing a compressed model
with its original. Every method reads and writes model directories, so ``ds generate``, ``ds eval`` and
``ds serve`` use a compressed model unchanged (see docs/compression.md).

    from deepseek.compress import compress, compare
    path, summary = compress("runs/quickstart/model", "runs/int8", "int8-dynamic")
"""

from deepseek.compress.distill import (classifier_distill_loss_fn, distill_lm, distillation_loss,
                                       init_student_from_teacher, lm_distill_loss_fn, student_config)
from deepseek.compress.finetune import finetune, finetune_config, validation_perplexity
from deepseek.compress.pipeline import compress
from deepseek.compress.prune import (PruneReport, gather_router_stats, prune_channels, prune_experts,
                                     prune_unstructured)
from deepseek.compress.qat import convert_qat, prepare_qat
from deepseek.compress.quantize import SCHEMES, compression_record, quantization_entry, quantize, save_compressed
from deepseek.compress.report import CompressionReport, compare, print_report, write_report
from deepseek.compress.static_int8 import (convert_static_int8_qat, load_static_int8, prepare_static_int8_qat,
                                           quantize_static_int8, save_static_int8)

__all__ = [
    "CompressionReport", "PruneReport", "SCHEMES", "classifier_distill_loss_fn", "compare", "compress",
    "compression_record", "convert_qat", "convert_static_int8_qat", "distill_lm", "distillation_loss",
    "finetune", "finetune_config", "gather_router_stats", "init_student_from_teacher", "lm_distill_loss_fn",
    "load_static_int8", "prepare_qat", "prepare_static_int8_qat", "print_report", "prune_channels",
    "prune_experts", "prune_unstructured", "quantization_entry", "quantize", "quantize_static_int8",
    "save_compressed", "save_static_int8", "student_config", "validation_perplexity", "write_report",
]
