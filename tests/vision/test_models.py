"""DeepseekForImageClassification: both architectures, save/load round trip, the MoE layer is ours."""

import pytest
import torch

from deepseek.config import ConfigError
from deepseek.nn.moe import MoE
from deepseek.vision.models import DeepseekForImageClassification, ModelDirectoryError, VisionConfig


@pytest.mark.parametrize("arch", ["resnet", "moe-vit"])
def test_forward_backward_and_round_trip(arch, tmp_path):
    torch.manual_seed(0)
    config = VisionConfig(arch=arch, num_channels=3, image_size=16, num_labels=5, widths=[4, 8], d_model=16,
                          depth=1, n_heads=2, expert_dim=8, shared_expert_dim=8)
    model = DeepseekForImageClassification(config)
    x = torch.randn(3, 3, 16, 16)
    logits = model(x)
    assert logits.shape == (3, 5)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    loaded = DeepseekForImageClassification.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert loaded.config == config
    torch.testing.assert_close(loaded(x), model(x))


def test_moe_vit_uses_the_framework_moe_layer():
    model = DeepseekForImageClassification(VisionConfig(arch="moe-vit", depth=2))
    assert sum(isinstance(m, MoE) for m in model.modules()) == 2


def test_bad_config_and_folder(tmp_path):
    with pytest.raises(ConfigError, match="patch_size"):
        VisionConfig(arch="moe-vit", image_size=30, patch_size=4)
    with pytest.raises(ConfigError, match="arch"):
        VisionConfig(arch="vgg")
    with pytest.raises(ModelDirectoryError, match="config.json"):
        DeepseekForImageClassification.from_pretrained(tmp_path)
