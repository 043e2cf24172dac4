"""RandomAffine: identity when all ranges are zero, seeded draws repeat, background stays background."""

import torch

from deepseek.vision.augment import RandomAffine


def test_zero_ranges_are_the_identity():
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(RandomAffine(degrees=0, scale=(1, 1), shift=0)(x), x, atol=1e-5, rtol=0)


def test_seeded_and_fills_the_background():
    x = torch.full((4, 1, 16, 16), -1.0)
    x[:, :, 6:10, 6:10] = 1.0
    augment = RandomAffine(degrees=30, scale=(0.8, 1.2), shift=0.2, fill=-1.0)
    a = augment(x, torch.Generator().manual_seed(1))
    b = augment(x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, x)
    assert a[:, :, 0, 0].eq(-1.0).all()  # corners come from outside the image: the fill value
    assert a.min() >= -1.0 - 1e-5 and a.max() <= 1.0 + 1e-5
