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


def test_moe_vit_uses_the_framework_moe_layer_initialised():
    torch.manual_seed(0)
    model = DeepseekForImageClassification(VisionConfig(arch="moe-vit", depth=2))
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert len(moes) == 2
    for moe in moes:  # the MoE layer leaves these to its model: torch.empty would be garbage
        assert 0.01 < moe.experts.gate_up.std() < 0.03 and 0.01 < moe.router.weight.std() < 0.03
    assert torch.isfinite(model(torch.randn(2, 1, 32, 32))).all()


def test_bad_config_and_folder(tmp_path):
    with pytest.raises(ConfigError, match="patch_size"):
        VisionConfig(arch="moe-vit", image_size=30, patch_size=4)
    with pytest.raises(ConfigError, match="arch"):
        VisionConfig(arch="vgg")
    with pytest.raises(ModelDirectoryError, match="config.json"):
        DeepseekForImageClassification.from_pretrained(tmp_path)
