"""Shared compression-test setup: a briefly trained ``tiny`` model (on ``lm_data`` from tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

import deepseek as ds
from deepseek.compress.finetune import finetune, finetune_config
from deepseek.data import byte_tokenizer


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory, lm_data):
    """A ``tiny`` model trained for 60 steps on ``lm_data`` and saved: the original every method compresses.

    Trained rather than random so that quantization and pruning tolerances mean something. Do not modify it.
    """
    torch.manual_seed(0)
    model = ds.MoETransformer(ds.preset("tiny"))
    run = tmp_path_factory.mktemp("compress-trained")
    cfg = finetune_config(lm_data, run / "run", steps=60, lr=3e-3, batch_size=8, seq_len=64, warmup_steps=5,
                          progress=False, eval_batches=2)
    finetune(model, cfg)
    return ds.save(model, byte_tokenizer(), run / "model")
