"""Image classification: ``DeepseekImageProcessor`` (resize, crop, normalise PIL images, arrays and encoded bytes)
and ``DeepseekForImageClassification`` (a small ResNet-style CNN, or a patch transformer whose MLPs are our MoE
layer). Layer: beside ``models`` — may import nn, data, config, hardware, errors, atomic."""

from deepseek.vision.models import DeepseekForImageClassification, VisionConfig
from deepseek.vision.processor import DeepseekImageProcessor, ImageDecodeError, decode_image, encode_png

__all__ = ["DeepseekForImageClassification", "DeepseekImageProcessor", "ImageDecodeError", "VisionConfig",
           "decode_image", "encode_png"]
