"""DeepseekImageProcessor: every input form gives the same tensor; config round trip; bad input is one line."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from deepseek.config import ConfigError
from deepseek.vision.processor import DeepseekImageProcessor, ImageDecodeError, encode_png


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(8, 8), dtype=np.uint8)


def test_array_pil_png_and_jpeg_agree(image):
    processor = DeepseekImageProcessor(size=32, crop_size=32)
    from_array = processor(image)
    assert from_array.shape == (1, 1, 32, 32) and from_array.dtype == torch.float32
    torch.testing.assert_close(processor(Image.fromarray(image)), from_array, rtol=0, atol=0)
    torch.testing.assert_close(processor(encode_png(image)), from_array, rtol=0, atol=0)  # PNG is lossless
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    assert processor(buffer.getvalue()).shape == (1, 1, 32, 32)


def test_rescale_normalise_and_crop():
    processor = DeepseekImageProcessor(size=10, crop_size=6, image_mean=[0.5], image_std=[0.25])
    white = np.full((10, 10), 255, dtype=np.uint8)
    torch.testing.assert_close(processor(white), torch.full((1, 1, 6, 6), 2.0))
    floats = np.zeros((10, 10), dtype=np.float32)  # float arrays are already 0..1: not rescaled
    torch.testing.assert_close(processor(floats), torch.full((1, 1, 6, 6), -2.0))


def test_channels_converted():
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    grey = DeepseekImageProcessor(size=4, crop_size=4, do_normalize=False)(rgb)
    torch.testing.assert_close(grey, torch.full((1, 1, 4, 4), 0.299))
    colour = DeepseekImageProcessor(size=4, crop_size=4, num_channels=3, do_normalize=False)
    rgba = np.concatenate([rgb, np.full((4, 4, 1), 7, np.uint8)], axis=2)
    assert colour([rgba, rgb[..., 0]]).shape == (2, 3, 4, 4)


def test_save_and_load(tmp_path):
    processor = DeepseekImageProcessor(size=24, crop_size=20, num_channels=3, image_mean=[0.1, 0.2, 0.3],
                                       image_std=[1.0, 2.0, 3.0])
    path = processor.save_pretrained(tmp_path)
    assert path.name == "preprocessor_config.json"
    assert DeepseekImageProcessor.from_pretrained(tmp_path) == processor
    path.write_text('{"size": 8, "crop_size": 9}')
    with pytest.raises(ConfigError, match="preprocessor_config.json.*crop_size"):
        DeepseekImageProcessor.from_pretrained(tmp_path)


@pytest.mark.parametrize("bad, message", [
    (b"\x89PNG\r\n\x1a\n-truncated", "not a readable PNG/JPEG"),
    (b"", "empty bytes"),
    ("a string", "got str"),
    (np.zeros((2, 2, 2, 2, 2), np.uint8), "not HW or HWC"),
    (np.zeros((2, 2), np.int64), "neither uint8 nor float"),
])
def test_bad_inputs_are_one_line_errors(bad, message):
    with pytest.raises(ImageDecodeError, match=message) as caught:
        DeepseekImageProcessor()([np.zeros((8, 8), np.uint8), bad])
    assert "\n" not in str(caught.value) and "image 1" in str(caught.value)
