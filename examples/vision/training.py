"""Training any image classifier with deepseek's generic Trainer: resumable augmented batches, the loss, the
evaluation. The Trainer brings AdamW + warm-up/cosine, clipping, metrics.jsonl, the progress bar, checkpoints;
this file brings what is particular to images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

from deepseek.train.config import load_train_config
from deepseek.train.trainer import Trainer
from deepseek.vision.augment import RandomAffine

# The recipe every network of the run gets (ours and the ResNet-18 baseline): "trained the same way".
TRAIN_DEFAULTS = ["batch_size=64", "precision=fp32", "optimizer.lr=3e-3", "optimizer.weight_decay=0.05",
                  "schedule.warmup_steps=30", "log_every=20", "checkpoint.every=0", "checkpoint.keep_last=1"]


class AugmentedBatches:
    """Endless (pixels, labels) batches, reshuffled every epoch and freshly augmented on every draw.

    Epoch ``e``'s order and batch ``i``'s augmentation come from generators seeded with ``(seed, e)`` and
    ``(seed, e, i)``, so the state is ``{"epoch", "position"}`` and a resumed run sees the very same batches.
    """

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 augment: Optional[RandomAffine], seed: int = 0):
        self.pixels, self.labels, self.batch_size = pixels, labels, min(batch_size, len(labels))
        self.augment, self.seed = augment, seed
        self.epoch, self.position = 0, 0

    def _generator(self, *key: int) -> torch.Generator:
        return torch.Generator().manual_seed(hash((self.seed, *key)) % 2**63)

    def __iter__(self) -> "AugmentedBatches":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self.batch_size > len(self.labels):
            self.epoch, self.position = self.epoch + 1, 0
        order = torch.randperm(len(self.labels), generator=self._generator(self.epoch))
        idx = order[self.position:self.position + self.batch_size]
        batch = self.pixels[idx]
        if self.augment is not None:
            batch = self.augment(batch, self._generator(self.epoch, self.position))
        self.position += self.batch_size
        return batch, self.labels[idx]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])


def cross_entropy_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    images, labels = batch
    return F.cross_entropy(model(images), labels)


@torch.no_grad()
def predict(model: nn.Module, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted classes [N] (eval mode for the call, the model's mode restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device  # the Trainer may have moved it to the GPU
    out = torch.cat([model(chunk.to(device)).argmax(-1).cpu() for chunk in pixels.split(batch_size)])
    model.train(was_training)
    return out


def make_eval_fn(pixels: torch.Tensor, labels: torch.Tensor) -> Callable[[nn.Module], dict[str, float]]:
    def evaluate(model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        logits = torch.cat([model(chunk.to(device)).float().cpu() for chunk in pixels.split(256)])
        return {"val_loss": F.cross_entropy(logits, labels).item(),
                "val_accuracy": (logits.argmax(-1) == labels).float().mean().item()}
    return evaluate


def train_classifier(model: nn.Module, run_dir: Path, train: tuple[torch.Tensor, torch.Tensor],
                     test: tuple[torch.Tensor, torch.Tensor], *, steps: int, augment: Optional[RandomAffine],
                     save_model: Optional[Callable[[nn.Module, Path], None]] = None, overrides: list[str] = (),
                     seed: int = 0) -> nn.Module:
    """Train ``model`` with the Trainer for ``steps`` batches; returns the trained model (eval mode)."""
    config = load_train_config(None, [*TRAIN_DEFAULTS, f"run_dir={run_dir}", f"max_steps={steps}",
                                      f"eval_every={max(steps // 2, 1)}", f"seed={seed}", *overrides])
    batches = AugmentedBatches(*train, config.batch_size, augment, seed=config.seed)
    trainer = Trainer(model, config, batches=batches, loss_fn=cross_entropy_loss, eval_fn=make_eval_fn(*test),
                      save_model=save_model, throughput_unit="img/s")
    trainer.fit()
    return trainer.model.eval()
