"""Gradient-norm clipping: none, a fixed threshold, or a threshold that follows recent gradient norms."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from deepseek.train.config import ClipConfig

# Smallest log-norm spread the dynamic threshold assumes (1%): a perfectly steady norm would otherwise
# put the threshold on the norm itself, and rounding alone would count every other step as clipped.
_MIN_LOG_STD = 0.01


@dataclass
class ClipResult:
    """What one call of :class:`GradientClipper` saw and did."""

    grad_norm: float  # total L2 norm of all gradients before clipping (inf or nan when non-finite)
    threshold: float  # the norm gradients were clipped to, if above it (inf in mode "none")
    clipped: bool  # gradients were scaled down, or the norm is non-finite (the step should be skipped)

    @property
    def finite(self) -> bool:
        """False when a gradient holds inf or nan: the gradients were left as they are, skip the step."""
        return math.isfinite(self.grad_norm)


def _clip_by_layout(params: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
    """``clip_grads_with_norm_`` once per gradient layout: its foreach kernel takes plain tensors or DTensors of
    one mesh (tensor-parallel and FSDP shards), not a mix. One process: a single call over every parameter."""
    groups: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        g = p.grad
        groups.setdefault((type(g), getattr(g, "device_mesh", None), getattr(g, "placements", None)), []).append(p)
    for group in groups.values():
        clip_grads_with_norm_(group, max_norm, total_norm, foreach=None)


class GradientClipper:
    """Clip the total gradient norm to a threshold, fixed or following recent norms.

    ``clipper(model.parameters())`` computes the total L2 norm of all gradients once, scales them down
    to the threshold when the norm is above it, and returns a :class:`ClipResult`.

    Modes (``cfg.mode``):

    - ``none``: never clip; the norm is still measured and reported.
    - ``fixed``: threshold ``cfg.max_norm``.
    - ``dynamic``: the threshold follows the statistics of ``log(norm)``::

          threshold = clamp(exp(mean + sigmas * std), min_norm, max_norm)

      where ``mean`` and ``std`` are exponentially weighted (factor ``beta``) over past steps. For
      the first ``warmup_steps`` steps the threshold is ``max_norm`` while statistics accumulate.
      Every step then feeds its *post-clip* norm, ``min(norm, threshold)``, into the statistics, so a
      spike enters as the threshold value and barely moves them; a lasting rise of the norm still
      lifts the threshold (each clipped step widens the std by ~7% with the defaults), so the
      rule follows a genuine change of scale instead of clipping forever.

      Why the log: gradient norms change scale by orders of magnitude over a run and are right-skewed;
      in log space the threshold is a multiplicative band around the typical norm (``exp(sigmas·std)``
      times it), the same rule at a norm of 1e-2 or 10, and one huge spike cannot dominate the variance.
      The averages are exact running means for the first ``1/(1-beta)`` steps (weight
      ``max(1-beta, 1/n)`` for the n-th value), so no bias correction is needed. ``max_norm`` is a
      ceiling: dynamic clipping is never looser than fixed clipping at ``max_norm``, only tighter when
      the norms are smaller and steady.

    A non-finite norm leaves the gradients and the statistics untouched and is reported with
    ``clipped=True`` (``result.finite`` is False): the caller skips the optimizer step.
    ``state_dict()`` holds plain numbers, so it goes into JSON and a resumed run continues identically.
    """

    def __init__(self, cfg: ClipConfig, norm_fn: Optional[Callable[[list[torch.Tensor]], torch.Tensor]] = None):
        self.cfg = cfg
        # norm_fn(params) -> 0-d tensor, the total L2 norm of their gradients; layouts whose gradients differ per
        # rank (sharded experts) pass one that reduces over the ranks. Default: the local get_total_norm.
        self.norm_fn = norm_fn
        self.count = 0  # finite norms observed (dynamic mode)
        self.mean = 0.0  # EMA of log(post-clip norm)
        self.var = 0.0  # EMA of its squared deviation

    @property
    def threshold(self) -> float:
        """The threshold the next call applies."""
        cfg = self.cfg
        if cfg.mode == "none":
            return math.inf
        if cfg.mode == "fixed" or self.count < max(cfg.warmup_steps, 1):
            return cfg.max_norm
        std = max(math.sqrt(self.var), _MIN_LOG_STD)
        return min(cfg.max_norm, max(cfg.min_norm, math.exp(self.mean + cfg.sigmas * std)))

    def __call__(self, parameters: Union[torch.Tensor, Iterable[torch.Tensor]]) -> ClipResult:
        """Measure, clip in place and report the gradients of ``parameters`` (those with a ``.grad``)."""
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        params = [p for p in parameters if p.grad is not None]
        threshold = self.threshold
        if not params:
            return ClipResult(grad_norm=0.0, threshold=threshold, clipped=False)
        if self.norm_fn is not None:
            total_norm = self.norm_fn(params)
        else:
            total_norm = get_total_norm([p.grad for p in params], norm_type=2.0, foreach=None)
        grad_norm = total_norm.item()  # host sync: the decision, the statistics and the log need the value
        if not math.isfinite(grad_norm):
            return ClipResult(grad_norm=grad_norm, threshold=threshold, clipped=True)
        clipped = grad_norm > threshold
        if clipped:
            _clip_by_layout(params, threshold, total_norm)
        if self.cfg.mode == "dynamic":
            self._observe(min(grad_norm, threshold))
        return ClipResult(grad_norm=grad_norm, threshold=threshold, clipped=clipped)

    def _observe(self, norm: float) -> None:
        x = math.log(max(norm, self.cfg.min_norm))
        self.count += 1
        alpha = max(1.0 - self.cfg.beta, 1.0 / self.count)
        delta = x - self.mean
        self.mean += alpha * delta
        self.var = (1.0 - alpha) * (self.var + alpha * delta * delta)

    def state_dict(self) -> dict[str, Any]:
        """The statistics as plain numbers (JSON-serializable)."""
        return {"count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        missing = {"count", "mean", "var"} - set(state)
        if missing:
            raise ValueError(f"clipper state is missing {', '.join(sorted(missing))}")
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.var = float(state["var"])
