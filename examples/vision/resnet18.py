"""The baseline network: ResNet-18's architecture, written out here because torchvision does not import on this
CPU build of torch (its PyPI wheel is built against CUDA torch). Same layout as ``torchvision.models.resnet18``:
7x7/2 stem + 3x3/2 max-pool, BasicBlock stages [2, 2, 2, 2] of 64, 128, 256, 512 channels, global average pool,
fully connected head; only ``in_channels`` differs (1 for greyscale digits). 11.2 M parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from deepseek.vision.models import BasicBlock


class ResNet18(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        layers, c_in = [], 64
        for i, width in enumerate((64, 128, 256, 512)):
            for j in range(2):
                layers.append(BasicBlock(c_in, width, stride=2 if (i > 0 and j == 0) else 1))
                c_in = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(x)).mean(dim=(2, 3)))
