"""One training step's forward and backward: micro-batches, autocast, the fp16 loss scaler, gradient accumulation.

The one copy of it: the :class:`~deepseek.train.trainer.Trainer` runs it (through its plan, which brackets each
micro-batch with its gradient synchronisation), the pipeline schedule takes its autocast and loss scaling, and the
parameter server's workers run it on the batches they pull.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional

import torch
from torch import nn

LossFn = Callable[[nn.Module, Any], torch.Tensor]
GradSync = Callable[[bool], ContextManager]  # last_micro_batch -> the context one micro-batch runs in


def autocast(device_type: str, dtype: Optional[torch.dtype]) -> ContextManager:
    """``torch.autocast`` to ``dtype`` on ``device_type``; nothing for fp32 (``dtype`` None)."""
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def split_batch(batch: Any, parts: int) -> list[Any]:
    """Cut a batch into ``parts`` micro-batches along dim 0: tensors, tuples/lists/dicts of them, dataclasses."""
    if parts == 1:
        return [batch]
    if isinstance(batch, torch.Tensor):
        if batch.shape[0] % parts:
            raise ValueError(f"batch of {batch.shape[0]} rows does not split into {parts} micro-batches")
        return list(batch.chunk(parts))
    if isinstance(batch, (tuple, list)):
        columns = [split_batch(item, parts) if isinstance(item, torch.Tensor) else [item] * parts for item in batch]
        return [type(batch)(col[i] for col in columns) for i in range(parts)]
    if isinstance(batch, dict):
        columns = {k: split_batch(v, parts) if isinstance(v, torch.Tensor) else [v] * parts for k, v in batch.items()}
        return [{k: col[i] for k, col in columns.items()} for i in range(parts)]
    if dataclasses.is_dataclass(batch):
        fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
        columns = {k: split_batch(v, parts) if isinstance(v, torch.Tensor) else [v] * parts for k, v in fields.items()}
        return [dataclasses.replace(batch, **{k: col[i] for k, col in columns.items()}) for i in range(parts)]
    raise TypeError(f"cannot split a batch of type {type(batch).__name__} into micro-batches")


def move_batch(batch: Any, device: torch.device) -> Any:
    """``batch`` (tensors, or tuples/lists/dicts/dataclasses of them) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_batch(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: move_batch(v, device) for k, v in batch.items()}
    if dataclasses.is_dataclass(batch):
        return dataclasses.replace(batch, **{f.name: move_batch(getattr(batch, f.name), device)
                                             for f in dataclasses.fields(batch)})
    return batch


@dataclass
class ForwardBackward:
    """Forward and backward of one step's micro-batches through ``model`` with ``loss_fn(model, micro_batch)``.

    Each micro-batch's loss (plus the MoE aux loss of ``aux_model``, the unwrapped model, when it has one) is divided
    by the number of micro-batches, so the accumulated gradients are those of the step's mean loss; under fp16 the
    ``scaler`` scales it before backward. ``model`` is what runs forward: wrapped by a plan, compiled, or plain.
    """

    model: nn.Module
    loss_fn: LossFn
    device_type: str = "cpu"
    autocast_dtype: Optional[torch.dtype] = None
    scaler: Optional[torch.amp.GradScaler] = None
    aux_model: Optional[nn.Module] = None  # default: ``model``

    def autocast(self) -> ContextManager:
        """The step's autocast context (the pipeline's stages and evaluation run in it too)."""
        return autocast(self.device_type, self.autocast_dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` as backward should see it: scaled by the fp16 loss scaler, if any."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def __call__(self, micro_batches: list[Any],
                 grad_sync: Optional[GradSync] = None) -> tuple[float, Optional[float]]:
        """Forward + backward of every micro-batch (gradients accumulate); returns (loss sum, aux-loss sum), the
        latter None when the model has no aux loss. ``grad_sync(last_micro_batch)`` brackets each micro-batch
        (data-parallel plans reduce on the last only)."""
        loss_sum, aux_sum = 0.0, None
        aux_model = self.aux_model if self.aux_model is not None else self.model
        for i, micro in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with grad_sync(last) if grad_sync is not None else contextlib.nullcontext():
                with self.autocast():
                    loss = self.loss_fn(self.model, micro)
                aux = getattr(aux_model, "aux_loss", None)
                aux = aux() if callable(aux) else None
                total = (loss + aux if aux is not None else loss) / len(micro_batches)
                self.scale(total).backward()
            loss_sum += loss.detach().float().item()
            if aux is not None:
                aux_sum = (aux_sum or 0.0) + aux.detach().float().item()
        return loss_sum, aux_sum
