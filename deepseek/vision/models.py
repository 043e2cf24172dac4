"""``DeepseekForImageClassification``: a small ResNet-style CNN, or a patch transformer whose MLPs are our MoE.

    config = VisionConfig(arch="resnet", num_channels=1, image_size=32, num_labels=10)
    model = DeepseekForImageClassification(config)
    logits = model(pixels)                                   # [B, C, H, W] float -> [B, num_labels]
    model.save_pretrained("runs/vision/model")               # config.json + model.safetensors
    model = DeepseekForImageClassification.from_pretrained("runs/vision/model")

``resnet``: a 3x3 stem, then ``len(widths)`` stages of ``blocks`` BasicBlocks (two 3x3 conv-BN, identity or
1x1-projection shortcut; every stage after the first halves the resolution), global average pool, linear head.
``moe-vit``: ``patch_size`` patches linearly embedded plus learned positions and a [CLS] token, ``depth``
pre-norm blocks of multi-head attention and :class:`deepseek.nn.moe.MoE` (sigmoid router with DeepSeek-V3's
aux-loss-free balancing, which the Trainer updates, plus a shared expert), then the [CLS] row's LayerNorm to the
head. Legend: B batch, C channels, H/W height/width, P patches (+1 with [CLS]), D width.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from deepseek.config import ConfigError, from_dict
from deepseek.errors import UserFacingError
from deepseek.nn.moe import GroupedExperts, MoE, MoEConfig, Router
from deepseek.nn.router import RouterConfig

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


class ModelDirectoryError(UserFacingError, RuntimeError):
    """A classifier folder is missing a file or holds a corrupt one: the message names it."""


@dataclass
class VisionConfig:
    arch: Literal["resnet", "moe-vit"] = "resnet"
    num_channels: int = 1
    image_size: int = 32
    num_labels: int = 10
    # resnet
    widths: list[int] = field(default_factory=lambda: [16, 32, 64])
    blocks: int = 1  # BasicBlocks per stage
    # moe-vit
    patch_size: int = 4
    d_model: int = 64
    depth: int = 2
    n_heads: int = 4
    n_experts: int = 4
    top_k: int = 2
    expert_dim: int = 64
    shared_expert_dim: int = 64  # 0: no shared expert
    dropout: float = 0.0
    model_type: str = "deepseek_image_classifier"

    def __post_init__(self):
        if self.arch not in ("resnet", "moe-vit"):
            raise ConfigError(f"arch must be 'resnet' or 'moe-vit', got {self.arch!r}")
        if min(self.num_channels, self.image_size, self.num_labels) < 1:
            raise ConfigError("num_channels, image_size and num_labels must be >= 1")
        if self.arch == "resnet" and (not self.widths or min(self.widths) < 1 or self.blocks < 1):
            raise ConfigError(f"resnet needs widths >= 1 and blocks >= 1, got {self.widths}, {self.blocks}")
        if self.arch == "moe-vit":
            if self.image_size % self.patch_size:
                raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
            if self.d_model % self.n_heads:
                raise ConfigError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")
            if not 1 <= self.top_k <= self.n_experts:
                raise ConfigError(f"need 1 <= top_k ({self.top_k}) <= n_experts ({self.n_experts})")


# -- resnet ----------------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    """He et al.'s two-conv residual block (ResNet-18/34)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                         if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNetBackbone(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        widths = config.widths
        self.stem = nn.Sequential(nn.Conv2d(config.num_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, c_in = [], widths[0]
        for i, width in enumerate(widths):
            for j in range(config.blocks):
                layers.append(BasicBlock(c_in, width, stride=2 if (i > 0 and j == 0) else 1))
                c_in = width
        self.stages = nn.Sequential(*layers)
        self.out_features = c_in

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x_BCHW)).mean(dim=(2, 3))


# -- moe-vit ---------------------------------------------------------------------------------------------

class MoEViTBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        d = config.d_model
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attention = nn.MultiheadAttention(d, config.n_heads, dropout=config.dropout, batch_first=True)
        router = RouterConfig(n_experts=config.n_experts, top_k=config.top_k, kind="sigmoid")
        self.moe = MoE(MoEConfig(d_model=d, ffn_dim=config.expert_dim, router=router,
                                 n_shared_experts=1 if config.shared_expert_dim else 0,
                                 shared_ffn_dim=config.shared_expert_dim))

    def forward(self, x_BPD: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x_BPD)
        x_BPD = x_BPD + self.attention(h, h, h, need_weights=False)[0]
        return x_BPD + self.moe(self.norm2(x_BPD))


class MoEViTBackbone(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        p, d = config.patch_size, config.d_model
        n_patches = (config.image_size // p) ** 2
        self.patch_embed = nn.Conv2d(config.num_channels, d, p, p)  # one linear map per non-overlapping patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.positions = nn.Parameter(torch.randn(1, n_patches + 1, d) * 0.02)
        self.blocks = nn.ModuleList(MoEViTBlock(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(d)
        self.out_features = d
        self.reset_moe_parameters()

    @torch.no_grad()
    def reset_moe_parameters(self, std: float = 0.02) -> None:
        """The MoE layer leaves its expert and router weights uninitialised (its model initialises them, as
        :class:`~deepseek.models.transformer.MoETransformer` does): normal(0, std), balancing biases zero."""
        for module in self.modules():
            if isinstance(module, GroupedExperts):
                nn.init.normal_(module.gate_up, std=std)
                nn.init.normal_(module.down, std=std)
            elif isinstance(module, Router):
                nn.init.normal_(module.weight, std=std)
                module.expert_bias.zero_()

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        x_BPD = self.patch_embed(x_BCHW).flatten(2).transpose(1, 2)
        x_BPD = torch.cat([self.cls_token.expand(x_BPD.shape[0], -1, -1), x_BPD], dim=1) + self.positions
        for block in self.blocks:
            x_BPD = block(x_BPD)
        return self.norm(x_BPD[:, 0])


# -- the classifier --------------------------------------------------------------------------------------

class DeepseekForImageClassification(nn.Module):
    """Backbone (``config.arch``) + linear head: pixels [B, C, H, W] -> logits [B, num_labels]."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.backbone = ResNetBackbone(config) if config.arch == "resnet" else MoEViTBackbone(config)
        self.classifier = nn.Linear(self.backbone.out_features, config.num_labels)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(pixel_values))

    def save_pretrained(self, directory: str | Path) -> Path:
        """``config.json`` + ``model.safetensors`` (weights and BatchNorm/router-bias buffers), atomically."""
        from safetensors.torch import save_file

        from deepseek.atomic import write_atomically

        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}

        def write_into(folder: Path) -> None:
            (folder / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
            save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})

        return write_atomically(directory, write_into)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "DeepseekForImageClassification":
        """Rebuild from a folder written by :meth:`save_pretrained`; errors name the file. Returns eval mode."""
        folder = Path(directory)
        try:
            data = json.loads((folder / CONFIG_FILE).read_text())
        except OSError as exc:
            raise ModelDirectoryError(f"cannot read {folder / CONFIG_FILE}: {exc.strerror or exc}") from None
        except json.JSONDecodeError as exc:
            raise ModelDirectoryError(f"{folder / CONFIG_FILE} is corrupt: {exc}") from None
        if not isinstance(data, dict):
            raise ModelDirectoryError(f"{folder / CONFIG_FILE} is corrupt: expected a JSON object")
        try:
            config = from_dict(VisionConfig, data)
        except ConfigError as exc:
            raise ModelDirectoryError(f"{folder / CONFIG_FILE}: {exc}") from None
        model = cls(config)
        file = folder / WEIGHTS_FILE
        if not file.is_file():
            raise ModelDirectoryError(f"{file} is missing")
        from safetensors.torch import load_file
        try:
            model.load_state_dict(load_file(str(file)), strict=True)
        except Exception as exc:  # safetensors' own error type, or a shape/key mismatch
            raise ModelDirectoryError(f"{file} does not fit {CONFIG_FILE}: {str(exc)[:300]}") from None
        return model.eval()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
