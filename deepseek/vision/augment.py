"""Random affine augmentation of a processed batch, seeded: small rotations, scalings and shifts.

    augment = RandomAffine(degrees=12, scale=(0.9, 1.1), shift=0.1)
    x_BCHW = augment(x_BCHW, generator)        # each image its own draw; the same generator state, the same draw

Done on the float batch with ``affine_grid``/``grid_sample`` (bilinear, borders filled with the background
value), so training batches are augmented without going back to PIL. Digits are not mirror-symmetric, so there
is no flip. Legend: B batch, C channels, H/W height/width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch.nn import functional as F


@dataclass
class RandomAffine:
    degrees: float = 12.0  # rotation drawn uniformly in [-degrees, degrees]
    scale: tuple[float, float] = (0.9, 1.1)  # zoom factor drawn uniformly
    shift: float = 0.1  # translation, a fraction of the side, drawn uniformly in [-shift, shift] per axis
    fill: float = 0.0  # value of the pixels that come from outside the image (the processed background)

    def matrices(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """[n, 2, 3] affine matrices in ``affine_grid``'s normalised coordinates."""
        u = torch.rand(n, 4, generator=generator)
        angle = (u[:, 0] * 2 - 1) * math.radians(self.degrees)
        zoom = self.scale[0] + u[:, 1] * (self.scale[1] - self.scale[0])
        tx, ty = (u[:, 2] * 2 - 1) * self.shift * 2, (u[:, 3] * 2 - 1) * self.shift * 2  # the side spans 2 units
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom  # sampling grid: the inverse transform
        return torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)

    def __call__(self, x_BCHW: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        theta = self.matrices(x_BCHW.shape[0], generator).to(x_BCHW)
        grid = F.affine_grid(theta, list(x_BCHW.shape), align_corners=False)
        # grid_sample pads with zeros: shift so that the background is 0 there, and back
        return F.grid_sample(x_BCHW - self.fill, grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False) + self.fill
