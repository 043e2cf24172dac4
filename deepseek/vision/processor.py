"""``DeepseekImageProcessor``: images of any common form -> the float batch a classifier takes.

    processor = DeepseekImageProcessor(size=32, num_channels=1, image_mean=[0.5], image_std=[0.5])
    pixels = processor([pil_image, uint8_array, png_bytes])     # float32 [B, C, H, W]
    processor.save_pretrained("runs/vision/model")              # preprocessor_config.json, as Hugging Face's
    processor = DeepseekImageProcessor.from_pretrained("runs/vision/model")

Steps, in Hugging Face's order: channel conversion (``num_channels`` 1: luma, ITU-R 601 weights as PIL's "L";
3: grey replicated; alpha dropped) -> resize to ``size`` (bilinear with antialias, in torch, so that an array and
the PNG encoding of the same array give the very same tensor) -> center crop to ``crop_size`` -> rescale
(``rescale_factor``, 1/255) -> normalise (``image_mean``, ``image_std`` per channel).

Inputs: a PIL image, a numpy array HW or HWC (uint8 0..255 is rescaled; a float array is taken as already in
0..1 and is not rescaled), encoded PNG/JPEG/any PIL-readable bytes, or a list of these (sizes may differ).
Anything else, or bytes that do not decode, raise :class:`~deepseek.errors.UserFacingError` with one line
naming the image. Legend: B batch, C channels, H/W height/width.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
from torch.nn import functional as F

from deepseek.config import ConfigError
from deepseek.errors import UserFacingError

CONFIG_NAME = "preprocessor_config.json"
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, PIL's convert("L")
MAX_PIXELS = 4096 * 4096  # a decoded image larger than this is refused (decompression bombs)

ImageLike = Union["PIL.Image.Image", np.ndarray, bytes, bytearray, memoryview]  # noqa: F821


class ImageDecodeError(UserFacingError, ValueError):
    """An input that is not an image this processor reads (the server answers 400 with the message)."""


@dataclass
class DeepseekImageProcessor:
    """Resize, crop, rescale and normalise images into a float32 [B, C, H, W] tensor (see module docs)."""

    size: int = 32  # resize target, square (height = width)
    crop_size: int = 32  # center crop after the resize (= size: no crop)
    num_channels: int = 1
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: list[float] = field(default_factory=lambda: [0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5])
    image_processor_type: str = "DeepseekImageProcessor"

    def __post_init__(self):
        if self.num_channels not in (1, 3):
            raise ConfigError(f"num_channels must be 1 or 3, got {self.num_channels}")
        if self.size < 1 or self.crop_size < 1 or self.crop_size > self.size:
            raise ConfigError(f"need 1 <= crop_size ({self.crop_size}) <= size ({self.size})")
        for name in ("image_mean", "image_std"):
            values = list(getattr(self, name))
            if len(values) == 1:
                values = values * self.num_channels
            if len(values) != self.num_channels:
                raise ConfigError(f"{name} has {len(values)} values for {self.num_channels} channel(s)")
            setattr(self, name, [float(v) for v in values])
        if any(s <= 0 for s in self.image_std):
            raise ConfigError(f"image_std must be > 0, got {self.image_std}")

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """[C, H, W] of one processed image."""
        side = self.crop_size if self.do_center_crop else self.size
        return (self.num_channels, side, side)

    # -- one image -------------------------------------------------------------------------------------

    def to_array(self, image: Any, index: int = 0) -> np.ndarray:
        """One input as an HWC numpy array (uint8, or float in 0..1)."""
        if isinstance(image, (bytes, bytearray, memoryview)):
            image = decode_image(bytes(image), index)
        if hasattr(image, "mode") and hasattr(image, "size") and hasattr(image, "convert"):  # a PIL image
            if image.mode not in ("L", "RGB", "RGBA", "LA"):
                image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
            image = np.asarray(image)
        if not isinstance(image, np.ndarray):
            raise ImageDecodeError(f"image {index}: expected a PIL image, a numpy array or encoded bytes, "
                                   f"got {type(image).__name__}")
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4) or 0 in image.shape:
            raise ImageDecodeError(f"image {index}: array shape {list(image.shape)} is not HW or HWC "
                                   f"(C = 1, 2, 3 or 4)")
        if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
            raise ImageDecodeError(f"image {index}: array dtype {image.dtype} is neither uint8 nor float")
        return image

    def to_tensor(self, image: Any, index: int = 0) -> torch.Tensor:
        """One input processed: float32 [C, H, W]."""
        array = self.to_array(image, index)
        scale = self.rescale_factor if (array.dtype == np.uint8 and self.do_rescale) else 1.0
        x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(2, 0, 1)  # [C, H, W]
        if x.shape[0] in (2, 4):
            x = x[:-1]  # drop alpha
        if self.num_channels == 1 and x.shape[0] == 3:
            x = (x * torch.tensor(LUMA).view(3, 1, 1)).sum(0, keepdim=True)
        elif self.num_channels == 3 and x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        if self.do_resize and tuple(x.shape[1:]) != (self.size, self.size):
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=True)[0]
        if self.do_center_crop:
            x = center_crop(x, self.crop_size)
        x = x * scale
        if self.do_normalize:
            mean = torch.tensor(self.image_mean).view(-1, 1, 1)
            std = torch.tensor(self.image_std).view(-1, 1, 1)
            x = (x - mean) / std
        return x.contiguous()

    # -- batches ---------------------------------------------------------------------------------------

    def __call__(self, images: Union[ImageLike, Sequence[ImageLike]]) -> torch.Tensor:
        """float32 [B, C, H, W] of one image or a list of them."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)  # a stacked batch [B, H, W, C]
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ImageDecodeError("no images given")
        return torch.stack([self.to_tensor(image, i) for i, image in enumerate(images)])

    preprocess = __call__

    # -- configuration ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DeepseekImageProcessor":
        from deepseek.config import from_dict

        if not isinstance(data, dict):
            raise ConfigError(f"image processor config must be a mapping, got {type(data).__name__}")
        return from_dict(cls, data)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``directory/preprocessor_config.json``; returns its path."""
        from deepseek.atomic import write_json_atomically

        path = Path(directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(path, self.to_dict())
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "DeepseekImageProcessor":
        """Read a ``preprocessor_config.json`` (or a directory holding one); ConfigError names the file."""
        file = Path(path)
        if file.is_dir():
            file = file / CONFIG_NAME
        try:
            data = json.loads(file.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read {file}: {exc.strerror or exc}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{file} is not valid JSON: {exc}") from None
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{file}: {exc}") from None


def center_crop(x: torch.Tensor, side: int) -> torch.Tensor:
    """The central ``side`` x ``side`` window of [C, H, W] (zero-padded where the image is smaller)."""
    h, w = x.shape[-2:]
    if h < side or w < side:
        pad_h, pad_w = max(side - h, 0), max(side - w, 0)
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        h, w = x.shape[-2:]
    top, left = (h - side) // 2, (w - side) // 2
    return x[..., top:top + side, left:left + side]


def decode_image(data: bytes, index: int = 0):
    """Encoded bytes -> a PIL image, fully loaded; ImageDecodeError (one line) when they are not an image."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageDecodeError(f"image {index}: empty bytes")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:
                raise ImageDecodeError(f"image {index}: {image.width}x{image.height} is larger than "
                                       f"{MAX_PIXELS} pixels")
            image.load()
            return image.copy()
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        head = data[:8].hex()
        raise ImageDecodeError(f"image {index}: {len(data)} bytes (starting {head}) are not a readable "
                               f"PNG/JPEG image: {type(exc).__name__}") from None


def encode_png(array: np.ndarray) -> bytes:
    """A uint8 HW or HWC array as PNG bytes (what a client sends)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8).squeeze()).save(buffer, format="PNG")
    return buffer.getvalue()
