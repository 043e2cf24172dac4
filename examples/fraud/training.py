"""The data a run works on, and training with deepseek's Trainer (focal loss, or distillation from a teacher).

``load_dataset`` turns the generated transactions into a :class:`deepseek.data.TimeSeriesSampler` (windows of
``window`` transactions, time split with a label-delay gap) and model inputs standardized on the training period
only. ``train_model`` runs the Trainer on class-balanced batches (weights 1/count) with
:class:`deepseek.nn.FocalLoss`; ``distill_model`` trains a student on the same batches against a frozen teacher
with :func:`deepseek.compress.classifier_distill_loss_fn` (Hinton's softened KL + cross-entropy).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from deepseek.data import BalancedBatches, TimeSeriesSampler
from deepseek.nn import FocalLoss
from deepseek.train.config import load_train_config
from deepseek.train.trainer import Trainer

from fraud.features import model_inputs, raw_features, windows_tensor
from fraud.generate import Transactions
from fraud.model import build_model

WINDOW = 16
GAP_DAYS = 7.0


@dataclass
class Dataset:
    tx: Transactions
    sampler: TimeSeriesSampler
    raw: np.ndarray           # [N, len(NUMERIC)] unscaled per-transaction features (for the baseline)
    inputs_NF: torch.Tensor   # [N, F] model inputs, standardized on the training period

    def windows(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sampler.windows(split)


def split_times(days: float) -> tuple[float, float, float]:
    """(val_start, test_start, gap) in days: about 60 % train, 20 % validation, 20 % test, 7-day gaps."""
    gap = min(GAP_DAYS, days / 25)
    return 0.6 * days + gap, 0.8 * days + gap, gap


def load_dataset(tx: Transactions, days: float, window: int = WINDOW) -> Dataset:
    val_start, test_start, gap = split_times(days)
    sampler = TimeSeriesSampler(tx.account, tx.time, tx.is_fraud, window=window, val_start=val_start,
                                test_start=test_start, gap=gap)
    raw = raw_features(tx)
    scaler = sampler.fit_standardizer(torch.from_numpy(raw).float())
    return Dataset(tx, sampler, raw, model_inputs(tx, raw, scaler))


class WindowBatches:
    """(x_BWF, y_B) batches of class-balanced training windows; resumable through the sampler's state."""

    def __init__(self, data: Dataset, batch_size: int, seed: int):
        self.idx_BW, self.labels_B = data.windows("train")
        self.inputs_NF = data.inputs_NF
        self.rows: BalancedBatches = data.sampler.balanced_batches("train", batch_size, seed, labels_B=self.labels_B)

    def __iter__(self) -> "WindowBatches":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = next(self.rows)
        return windows_tensor(self.inputs_NF, self.idx_BW[rows]), self.labels_B[rows]

    def state_dict(self) -> dict[str, Any]:
        return self.rows.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows.load_state_dict(state)


@torch.no_grad()
def predict(model: nn.Module, data: Dataset, split: str, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(labels, fraud probabilities) of every window of ``split``."""
    was_training = model.training
    model.eval()
    idx_BW, labels_B = data.windows(split)
    device = next(model.parameters()).device  # the Trainer's device (CUDA when available)
    scores = [torch.softmax(model(windows_tensor(data.inputs_NF, idx_BW[i:i + chunk]).to(device)).float(), -1)[:, 1].cpu()
              for i in range(0, len(labels_B), chunk)]
    model.train(was_training)
    return labels_B.numpy(), torch.cat(scores).numpy() if scores else np.zeros(0)


def _trainer_config(run_dir: Path, steps: int, batch_size: int, lr: float, seed: int, overrides=()):
    return load_train_config(None, [f"run_dir={run_dir}", f"max_steps={steps}", f"batch_size={batch_size}",
                                    "precision=fp32", f"optimizer.lr={lr}", "optimizer.weight_decay=0.01",
                                    f"schedule.warmup_steps={max(1, steps // 20)}", f"log_every={max(1, steps // 20)}",
                                    f"eval_every={steps}", f"checkpoint.every={steps}", f"seed={seed}", *overrides])


def _val_eval_fn(data: Dataset):
    from fraud.metrics import pr_auc

    def evaluate(model: nn.Module) -> dict[str, float]:
        labels, scores = predict(model, data, "val")
        eps = 1e-7
        bce = -np.mean(labels * np.log(scores + eps) + (1 - labels) * np.log(1 - scores + eps))
        return {"val_loss": float(bce), "val_pr_auc": pr_auc(labels, scores)}
    return evaluate


def save_model(model: nn.Module, path: Path) -> None:
    """Weights as safetensors plus ``hparams.json`` (enough to rebuild the module: :func:`load_model`)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "hparams.json").write_text(json.dumps(model.hparams) + "\n")


def load_model(path: Path) -> nn.Module:
    from safetensors.torch import load_file

    model = build_model(json.loads((Path(path) / "hparams.json").read_text()))
    model.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
    return model.eval()


def train_model(model: nn.Module, data: Dataset, run_dir: Path, *, steps: int, batch_size: int = 256,
                lr: float = 2e-3, gamma: float = 2.0, alpha: Optional[float] = None, seed: int = 0,
                teacher: Optional[nn.Module] = None, temperature: float = 1.0, distill_alpha: float = 0.5,
                overrides: tuple[str, ...] = ()) -> dict:
    """Train ``model`` in place (Trainer, class-balanced batches); with ``teacher``: distillation. Returns the
    final validation metrics; the weights land in ``run_dir/model``. ``overrides``: more TrainConfig
    ``key=value`` settings (``progress=false``, ...)."""
    torch.manual_seed(seed)
    focal = FocalLoss(alpha=alpha, gamma=gamma)
    if teacher is None:
        def loss_fn(m: nn.Module, batch) -> torch.Tensor:
            x, y = batch
            return focal(m(x), y)
    else:
        from deepseek.compress import classifier_distill_loss_fn
        loss_fn = classifier_distill_loss_fn(teacher, temperature=temperature, alpha=distill_alpha)
    trainer = Trainer(model, _trainer_config(run_dir, steps, batch_size, lr, seed, overrides),
                      batches=WindowBatches(data, batch_size, seed), loss_fn=loss_fn, eval_fn=_val_eval_fn(data),
                      save_model=save_model, throughput_unit="windows/s")
    result = trainer.fit()
    return dict(result.final_eval or {})
