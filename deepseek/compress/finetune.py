"""Short fine-tunes after compression (pruning, QAT, distillation) through the ordinary trainer.

Every compression method that trains goes through :class:`deepseek.train.Trainer`, so it gets the progress bar,
metrics.jsonl, checkpoints and exact resume (``resume=True``) for free. ``loss_fn`` replaces the plain LM loss
where a method needs another (distillation's teacher loss).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from deepseek.train.lm import evaluate_lm, lm_loss, make_loader
from deepseek.train.trainer import LossFn, Trainer, TrainResult
from deepseek.train.config import TrainConfig, load_train_config


def finetune_config(data: str | Path, run_dir: str | Path, *, steps: int, lr: float = 3e-4, batch_size: int = 16,
                    seq_len: int = 256, warmup_steps: int = 0, precision: str = "auto", seed: int = 0,
                    resume: bool = False, progress: bool = True, eval_batches: int = 8,
                    overrides: Optional[list[str]] = None) -> TrainConfig:
    """A :class:`TrainConfig` for a short fine-tune on one prepared data directory (``key=value`` overrides last)."""
    settings = [
        f"run_dir={run_dir}", f"max_steps={steps}", f"batch_size={batch_size}", f"precision={precision}",
        f"seed={seed}", f"progress={str(progress).lower()}", "tensorboard=false", "eval_every=0",
        f"data.path={data}", f"data.seq_len={seq_len}", f"data.eval_batches={eval_batches}",
        f"optimizer.lr={lr}", f"schedule.warmup_steps={warmup_steps}", "schedule.decay=cosine",
        f"checkpoint.every={max(steps // 4, 1)}", "checkpoint.keep_last=1", f"checkpoint.resume={str(resume).lower()}",
        "checkpoint.save_final=false",  # the caller saves the compressed model where it belongs
    ]
    return load_train_config(None, settings + list(overrides or []))


def finetune(model: nn.Module, config: TrainConfig, *, tokenizer: Any = None, loss_fn: LossFn = lm_loss,
             trainable: Optional[list[nn.Parameter]] = None) -> TrainResult:
    """Train ``model`` in place for ``config.max_steps`` steps on ``config.data``; returns the trainer's result.

    ``trainable`` (default: every parameter) limits what the optimizer updates; the others are frozen.
    """
    if trainable is not None:
        keep = {id(p) for p in trainable}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
    paths = [config.data.path]
    seq_len = config.data.schedule()[-1][1]

    def eval_fn(m: nn.Module) -> dict[str, float]:
        return evaluate_lm(m, paths, batch_size=config.micro_batch, seq_len=seq_len,
                           max_batches=config.data.eval_batches or None)

    trainer = Trainer(model, config, batches=make_loader(config), loss_fn=loss_fn, eval_fn=eval_fn,
                      tokenizer=tokenizer, trial_loss_fn=lm_loss if loss_fn is lm_loss else None)
    try:
        return trainer.fit()
    finally:
        model.eval()
        if trainable is not None:
            for p in model.parameters():
                p.requires_grad_(True)


@torch.no_grad()
def validation_perplexity(model: nn.Module, data: str | Path, *, seq_len: int = 256, batch_size: int = 8,
                          max_batches: Optional[int] = None) -> dict[str, float]:
    """``val_loss`` and ``val_ppl`` of ``model`` on the validation split of a prepared directory."""
    was_training = model.training
    model.eval()
    try:
        return evaluate_lm(model, [str(data)], batch_size=batch_size, seq_len=seq_len, max_batches=max_batches)
    finally:
        model.train(was_training)
