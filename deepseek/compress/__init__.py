"""Compression: quantization (PTQ and QAT), pruning, distillation, and the report comparing a compressed model
with its original. Every method reads and writes model directories, so ``ds generate``, ``ds eval`` and
``ds serve`` use a compressed model unchanged."""
