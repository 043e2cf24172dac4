"""Decoding steps declared in a model's ``config.yaml``, run per request before the dynamic batcher.

    inputs:  [{name: image, datatype: BYTES, shape: [1]}]          # what clients send: one encoded image a row
    outputs: [{name: logits, datatype: FP32, shape: [10]}]
    preprocess: {processor: preprocessor_config.json, input: image, output: pixel_values}

The client-facing signature (metadata, Triton model config) keeps the BYTES input; the model sees the FP32
``output`` [B, C, H, W] the :class:`~deepseek.vision.DeepseekImageProcessor` makes of the bytes, so the batcher
concatenates decoded images from many requests like any float input. An image that does not decode is the
client's error: a ValueError, which the front ends answer with 400 and the processor's one-line message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from deepseek.serve.config import PreprocessConfig, TensorSpec


class ImagePreprocess:
    """The ``preprocess: {kind: image}`` step of one model version (see module docs)."""

    def __init__(self, config: PreprocessConfig, version_path: Path):
        from deepseek.config import ConfigError
        from deepseek.vision.processor import DeepseekImageProcessor

        from deepseek.serve.backends.base import BackendError

        self.config = config
        candidates = [Path(version_path) / config.processor, Path(version_path).parent / config.processor]
        file = next((c for c in candidates if c.is_file()), None)
        if file is None:
            raise BackendError(f"preprocess.processor {config.processor!r}: neither "
                               f"{' nor '.join(str(c) for c in candidates)} exists")
        try:
            self.processor = DeepseekImageProcessor.from_pretrained(file)
        except ConfigError as exc:
            raise BackendError(str(exc)) from None

    def model_input(self, wire: TensorSpec) -> TensorSpec:
        """The spec of what the model receives in place of the BYTES input ``wire``."""
        return TensorSpec(name=self.config.output, datatype="FP32", shape=list(self.processor.output_shape),
                          optional=wire.optional)

    def __call__(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """``inputs`` with the BYTES input replaced by the processed float batch; ValueError for bad images."""
        name = self.config.input
        if name not in inputs:
            return dict(inputs)
        images = inputs[name]
        if not isinstance(images, np.ndarray) or images.dtype != object:
            raise ValueError(f"input {name!r}: datatype must be BYTES (encoded images)")
        if images.ndim != 2 or images.shape[1] != 1 or images.shape[0] < 1:
            raise ValueError(f"input {name!r}: shape {list(images.shape)} does not match [-1, 1] "
                             f"(one encoded image per row)")
        pixels = self.processor([bytes(item) for item in images[:, 0]])  # ImageDecodeError is a ValueError
        result = {k: v for k, v in inputs.items() if k != name}
        result[self.config.output] = pixels.to(torch.float32)
        return result
