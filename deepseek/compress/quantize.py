"""Post-training quantization of a deepseek model, and the ``compression.json`` that lets ``ds.load`` rebuild it.

    model, tokenizer = ds.load("runs/quickstart/model")
    quantize(model, "int8-dynamic")                                  # in place: Linear, experts, embeddings
    save_compressed(model, tokenizer, "runs/int8", compression_record("int8-dynamic", source=...))
    model, tokenizer = ds.load("runs/int8")                          # the quantized model, ready to run

The modules and kernels live in :mod:`deepseek.nn.quantized` (the model layer builds them when loading);
this module chooses what to quantize and writes the directory.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Optional

from torch import nn

from deepseek.models.directory import read_extra, save
from deepseek.nn.quantized import SCHEMES, check_scheme, is_quantized, quantize_modules


def quantize(model: nn.Module, scheme: str, *, group_size: int = 32, embeddings: bool = True) -> nn.Module:
    """Quantize ``model`` in place with ``scheme`` (one of :data:`SCHEMES`); returns it, in eval mode.

    Every attention and dense Linear, every routed and shared expert, the LM head and (``embeddings``) the
    embedding table are quantized; routers, norms and one-output gates stay fp32.
    """
    check_scheme(scheme)
    if is_quantized(model):
        raise ValueError("model is already quantized; quantize the original (floating-point) model")
    if group_size < 8 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= 8, got {group_size}")
    model.eval()
    return quantize_modules(model, scheme, group_size=group_size, embeddings=embeddings)


def compression_record(method: str, *, source: Optional[str | Path] = None, quantization: Optional[dict] = None,
                       **details: Any) -> dict[str, Any]:
    """The ``compression.json`` of a compressed directory: what was done, from what, when, and its details."""
    record: dict[str, Any] = {"method": method,
                              "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    if source is not None:
        record["source"] = str(source)
        previous = read_extra(source, "compression.json") if Path(source).is_dir() else None
        if previous:  # compressing a compressed model: keep the history
            record["previous"] = previous
    if quantization is not None:
        record["quantization"] = quantization
    record.update({k: v for k, v in details.items() if v is not None})
    return record


def quantization_entry(scheme: str, group_size: int = 32, embeddings: bool = True) -> dict[str, Any]:
    return {"scheme": check_scheme(scheme), "group_size": group_size, "embeddings": embeddings}


def save_compressed(model: nn.Module, tokenizer, out: str | Path, record: dict[str, Any], *,
                    source: Optional[str | Path] = None) -> Path:
    """Write ``model`` as a model directory with ``compression.json`` (generation defaults carried from ``source``)."""
    generation = read_extra(source, "generation.json") if source is not None else None
    return save(model, tokenizer, out, generation=generation, compression=record)


__all__ = ["SCHEMES", "compression_record", "quantization_entry", "quantize", "save_compressed"]
