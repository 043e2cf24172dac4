"""``method: mixed``: the seeds' ``objective: {sft: 0.7, rl: 0.2, dpo: 0.1}`` in one run.

Each step draws one batch from every weighted term's loader (:class:`MixedLoader`: SFT rows, GRPO prompts,
preference pairs, each from its own ``mixed.<term>.train`` file), computes each term's loss on the same model
(:class:`MixedLoss`) and sums them with :meth:`~deepseek.finetune.objectives.MixedObjective.combine`. Logged per
step: ``loss/<term>`` (each unweighted term), ``loss/total`` (the weighted sum, also the step's ``loss``) and each
term's own figures prefixed with its name (``rl/rewards/parses``, ``rl/kl``, ``dpo/rewards/accuracy``, ...).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from deepseek.finetune.objectives import MixedObjective

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class MixedLoader:
    """One batch of every term's loader per step, as ``{term: batch}``; ``state_dict()`` holds each loader's
    position, so a resumed run draws the same batches."""

    def __init__(self, loaders: dict[str, Any]):
        self.loaders = loaders

    def __iter__(self) -> "MixedLoader":
        return self

    def __next__(self) -> dict[str, Any]:
        return {term: next(loader) for term, loader in self.loaders.items()}

    def state_dict(self) -> dict[str, Any]:
        return {term: loader.state_dict() for term, loader in self.loaders.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for term, loader in self.loaders.items():
            loader.load_state_dict(state[term])


class MixedLoss:
    """``loss_fn(model, {term: batch})``: each term's loss on its batch, combined by ``objective``; ``last`` holds
    the logged figures of the module docstring."""

    def __init__(self, objective: MixedObjective, losses: dict[str, LossFn]):
        self.objective, self.losses = objective, losses
        self.last: dict[str, float] = {}

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        terms = {term: loss_fn(model, batch[term]) for term, loss_fn in self.losses.items()}
        total, logged = self.objective.combine(terms)
        last = {f"loss/{name}": value for name, value in logged.items()}
        for term, loss_fn in self.losses.items():
            last.update({f"{term}/{name}": value for name, value in getattr(loss_fn, "last", {}).items()})
        self.last = last
        return total
