import pytest
import torch

import deepseek as ds


@pytest.fixture(scope="module")
def tiny():
    """A random tiny MoE model and the byte tokenizer (eval mode, fixed seed)."""
    torch.manual_seed(0)
    return ds.MoETransformer(ds.preset("tiny")).eval(), ds.byte_tokenizer()
