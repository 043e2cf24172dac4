"""The shared fine-tune runs through the ordinary trainer: loss falls, frozen parameters stay put."""

import torch

import deepseek as ds
from deepseek.compress.finetune import finetune, finetune_config, validation_perplexity


def test_finetune_lowers_validation_loss_and_respects_frozen_parameters(tmp_path, lm_data, trained_tiny):
    model, _ = ds.load(trained_tiny)
    before = validation_perplexity(model, lm_data, seq_len=64, max_batches=2)
    frozen = model.embed.weight.detach().clone()
    trainable = [p for n, p in model.named_parameters() if n != "embed.weight"]
    cfg = finetune_config(lm_data, tmp_path / "ft", steps=20, lr=2e-3, batch_size=8, seq_len=64, progress=False,
                          eval_batches=2)
    result = finetune(model, cfg, trainable=trainable)
    after = validation_perplexity(model, lm_data, seq_len=64, max_batches=2)
    assert result.step == 20
    assert after["val_loss"] < before["val_loss"]
    assert torch.equal(model.embed.weight, frozen)
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again afterwards
    assert not model.training
