"""How fast this machine trains a given model, measured on the model itself before a run commits to a precision.

The hardware probe (:mod:`deepseek.hardware`) times bare matrix products; a training step also pays for
attention, casts under autocast, the loss, AdamW and — for MoE layers — expert products whose row counts change
every step. On a Sapphire Rapids Xeon (AMX) bf16 products of a token block are 1.7x fp32, yet the ``small`` MoE
preset trains 0.75-0.87x as fast in bf16: each new per-expert row count makes oneDNN build a new bf16 kernel,
while fp32 goes through MKL. So where the probe says bf16 *might* pay, the trainer times a real step of its own
model on its first batch in both precisions (:func:`precision_by_trial`), and the quickstart sizes its run from
:func:`measure_training_speed`.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from deepseek.hardware import PrecisionChoice, autocast
from torch import nn
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
                           steps: int = 3, warmup: int = 2, seed: int = 0) -> StepSpeed:
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


# bf16 has to beat fp32 by this much in the trial to be chosen: it also rounds, and a close call is noise.
TRIAL_MIN_SPEEDUP = 1.1


def time_forward_backward(model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any,
                          choice: PrecisionChoice) -> float:
    """Seconds of one forward + backward of ``loss_fn(model, batch)`` under ``choice``'s autocast."""
    start = time.perf_counter()
    with autocast(choice, next(model.parameters()).device.type):
        loss = loss_fn(model, batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def precision_by_trial(model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batches: list[Any],
                       fp32: PrecisionChoice, bf16: PrecisionChoice) -> PrecisionChoice:
    """The faster of ``fp32`` and ``bf16`` for this model, timed on a copy (the model, its buffers and the
    caller's RNG stay untouched): the first batch warms both up, then each further batch is run in both
    precisions, and the fastest step of each counts.

    Distinct batches matter: an MoE layer's per-expert row counts change with every batch, and a bf16 kernel
    built for one shape is not reused for the next (measured: the ``small`` preset's bf16 step takes 205 ms on a
    batch seen before, 380 ms on a new one, fp32 285 ms on either).
    """
    trial = copy.deepcopy(model).train()
    rng = torch.get_rng_state()
    try:
        times = {"fp32": [], "bf16": []}
        for i, batch in enumerate(batches):
            for name, choice in (("fp32", fp32), ("bf16", bf16)):
                took = time_forward_backward(trial, loss_fn, batch, choice)
                if i:  # the first batch warms up: allocation, kernel creation
                    times[name].append(took)
    finally:
        torch.set_rng_state(rng)
    best = {name: min(ts) for name, ts in times.items()}
    speedup = best["fp32"] / best["bf16"]
    measured = (f"measured this model's training step on {len(batches) - 1} batches: fp32 {best['fp32'] * 1e3:.0f} "
                f"ms, bf16 {best['bf16'] * 1e3:.0f} ms ({speedup:.2f}x)")
    winner = bf16 if speedup >= TRIAL_MIN_SPEEDUP else fp32
    return replace(winner, reason=f"{bf16.reason.split(';')[0]}; {measured}")
