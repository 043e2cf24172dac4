"""How fast this machine trains a given model: a few real steps on random tokens, before the run is planned.

The hardware probe (:mod:`deepseek.hardware`) times bare matrix products; a training step also pays for
attention, the experts' dispatch, casts under autocast, the loss and AdamW, so a precision whose products are
faster can still train slower. The quickstart measures the real step of its own model here, in each candidate
precision, and sizes its run from the result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from deepseek.hardware import PrecisionChoice, autocast
from deepseek.models.config import ModelConfig
from deepseek.models.transformer import MoETransformer
from deepseek.train.config import OptimizerConfig
from deepseek.train.optim import build_optimizer


@dataclass(frozen=True)
class StepSpeed:
    precision: str
    tokens_per_s: float
    seconds_per_step: float
    batch_size: int
    seq_len: int


def measure_training_speed(config: ModelConfig, choice: PrecisionChoice, *, batch_size: int, seq_len: int,
                           steps: int = 3, warmup: int = 1, seed: int = 0) -> StepSpeed:
    """Tokens/s of forward + backward + AdamW of a fresh ``config`` model on random tokens (fastest of ``steps``
    timed steps after ``warmup``: other work on the machine only ever slows a step down)."""
    torch.manual_seed(seed)
    model = MoETransformer(config).train()
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-4))
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(seed))

    def step() -> None:
        with autocast(choice):
            loss = model(ids[:, :-1], targets=ids[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    best = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return StepSpeed(choice.precision, batch_size * seq_len / best, best, batch_size, seq_len)
