"""FocalLoss: cross-entropy at gamma=0, a hand computation, alpha conventions, reductions, safe numerics."""

import math

import pytest
import torch
import torch.nn.functional as F

from deepseek.config import ConfigError
from deepseek.nn import FocalLoss


def test_binary_equals_bce_at_gamma_zero():
    torch.manual_seed(0)
    z, y = torch.randn(64) * 3, (torch.rand(64) < 0.3).float()
    assert torch.allclose(FocalLoss(gamma=0.0)(z, y), F.binary_cross_entropy_with_logits(z, y), atol=1e-6)


def test_multiclass_equals_cross_entropy_at_gamma_zero():
    torch.manual_seed(0)
    z, y = torch.randn(32, 5) * 2, torch.randint(0, 5, (32,))
    assert torch.allclose(FocalLoss(gamma=0.0)(z, y), F.cross_entropy(z, y), atol=1e-6)
    assert torch.allclose(FocalLoss(gamma=0.0, reduction="sum")(z, y), F.cross_entropy(z, y, reduction="sum"),
                          atol=1e-5)


def test_binary_matches_hand_computation():
    # logit 2 on a positive: p = sigmoid(2); FL = -0.25 (1 - p)^2 log p; logit 1 on a negative: p_t = 1 - sigmoid(1)
    z, y = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.0])
    p_pos, p_neg_t = 1 / (1 + math.exp(-2.0)), 1 - 1 / (1 + math.exp(-1.0))
    expected = [-0.25 * (1 - p_pos) ** 2 * math.log(p_pos), -0.75 * (1 - p_neg_t) ** 2 * math.log(p_neg_t)]
    got = FocalLoss(alpha=0.25, gamma=2.0, reduction="none")(z, y)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)


def test_multiclass_matches_hand_computation_and_binary_form():
    z, y = torch.tensor([[0.5, 1.5, -1.0]]), torch.tensor([1])
    p = torch.softmax(z, -1)[0, 1].item()
    expected = -0.4 * (1 - p) ** 1.5 * math.log(p)
    got = FocalLoss(alpha=[0.2, 0.4, 0.4], gamma=1.5)(z, y)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # two classes with logits [0, z] are the binary case with logit z
    z2 = torch.tensor([[0.0, 0.7], [0.0, -2.0]])
    y2 = torch.tensor([1, 0])
    assert torch.allclose(FocalLoss(alpha=0.3, gamma=2.0)(z2, y2),
                          FocalLoss(alpha=0.3, gamma=2.0)(z2[:, 1], y2.float()), atol=1e-6)


def test_positives_reduction_divides_by_positive_count():
    z, y = torch.tensor([0.1, -0.3, 2.0, 0.0]), torch.tensor([1.0, 0.0, 1.0, 0.0])
    per = FocalLoss(gamma=2.0, reduction="none")(z, y)
    assert FocalLoss(gamma=2.0, reduction="positives")(z, y).item() == pytest.approx(per.sum().item() / 2)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_confident_logits_give_finite_loss_and_gradients(gamma):
    z = torch.tensor([40.0, -40.0, 200.0, -200.0], requires_grad=True)
    y = torch.tensor([1.0, 0.0, 0.0, 1.0])  # two certain hits, two certain misses
    loss = FocalLoss(alpha=0.25, gamma=gamma)(z, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    z3 = torch.tensor([[60.0, -60.0], [-60.0, 60.0]], requires_grad=True)
    loss3 = FocalLoss(gamma=gamma)(z3, torch.tensor([0, 0]))
    loss3.backward()
    assert torch.isfinite(loss3) and torch.isfinite(z3.grad).all()


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ConfigError, match="reduction"):
        FocalLoss(reduction="avg")
    with pytest.raises(ConfigError, match="gamma"):
        FocalLoss(gamma=-1)
    with pytest.raises(ConfigError, match="alpha"):
        FocalLoss(alpha=1.5)
    with pytest.raises(ValueError, match="2 classes"):
        FocalLoss(alpha=0.25)(torch.zeros(2, 3), torch.tensor([0, 1]))
