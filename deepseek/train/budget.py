"""Fitting a run to its time limit: the number of optimizer steps, planned from measured step times.

With ``time_limit_minutes`` a run that only stopped at the limit would cut its learning-rate schedule short: on
a machine half as fast, the cosine would still be near its peak when the clock runs out. Instead the trainer
measures what a step costs after warm-up and sets the schedule's length so that the decay ends at the limit.

Step cost is modelled per unit of *work* (tokens, for language models): a curriculum that doubles the sequence
length doubles the predicted cost of the later steps, and the plan is revised once the new phase's real cost is
measured. Evaluations and checkpoints inside the run are counted too (estimated until the first one is timed).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Callable, Optional

WorkFn = Callable[[int], float]


@dataclass
class BudgetPlan:
    """One planning decision, as the run log and ``trainer.json`` report it."""

    at_step: int             # steps done when planned
    steps: int               # the schedule's new length (total optimizer steps)
    seconds_per_step: float  # measured, at the current work per step
    predicted_s: float       # predicted total run time with ``steps``
    limit_s: float

    def describe(self) -> str:
        return (f"time budget: {self.seconds_per_step * 1e3:.0f} ms/step measured at step {self.at_step} -> "
                f"{self.steps} steps, cosine ends at ~{self.predicted_s / 60:.1f} of {self.limit_s / 60:g} min")

    def to_dict(self) -> dict:
        return asdict(self)


class TimeBudget:
    """Plans how many steps fit in ``limit_s`` seconds of a run of at most ``max_steps``.

    ``work(step)``: relative cost of (0-based) step ``step`` (e.g. its tokens); ``eval_every`` and
    ``checkpoint_every`` say which steps also pay for an evaluation or a checkpoint, and the final evaluation and
    save are reserved for after the last step (each guessed from a step's time until one has been timed).
    """

    def __init__(self, limit_s: float, max_steps: int, *, work: Optional[WorkFn] = None, eval_every: int = 0,
                 checkpoint_every: int = 0, skip_steps: int = 2, measure_steps: int = 6, safety: float = 0.03):
        self.limit_s, self.max_steps = limit_s, max_steps
        self.work = work or (lambda step: 1.0)
        self.eval_every, self.checkpoint_every = eval_every, checkpoint_every
        self.skip_steps, self.measure_steps, self.safety = skip_steps, measure_steps, safety
        self._samples: dict[float, list[float]] = {}  # work per step -> measured seconds per unit of work
        self._seen: dict[float, int] = {}             # work per step -> steps seen (first ones are skipped)
        self.eval_s: Optional[float] = None
        self.checkpoint_s: Optional[float] = None
        self.plan: Optional[BudgetPlan] = None
        self._dirty = False
        self.plans: list[BudgetPlan] = []

    # -- measurements and planning -------------------------------------------------------------------

    def _cost_per_work(self, work: float) -> Optional[float]:
        """Seconds per unit of work at this work level: measured there, else the nearest level measured."""
        if self._samples.get(work):
            return statistics.median(self._samples[work][-20:])
        measured = [w for w, s in self._samples.items() if s]
        if not measured:
            return None
        nearest = min(measured, key=lambda w: abs(w - work))
        return statistics.median(self._samples[nearest][-20:])

    def wants_plan(self) -> bool:
        """Is there a new measurement worth (re)planning on? The first plan comes once ``measure_steps`` steps are
        measured; later ones when a new work level (curriculum phase) has been measured that long, and after each
        evaluation or checkpoint (their cost is a guess until timed, and the clock shows any drift since)."""
        return self._dirty

    def record_step(self, step: int, seconds: float) -> None:
        """Step ``step`` (0-based) took ``seconds`` of training (no evaluation or checkpoint inside)."""
        work = self.work(step)
        seen = self._seen.get(work, 0)
        self._seen[work] = seen + 1
        if seen >= self.skip_steps:  # the first steps at a new shape pay for allocation and kernel selection
            samples = self._samples.setdefault(work, [])
            samples.append(seconds / work)
            self._dirty |= len(samples) == self.measure_steps

    def record_eval(self, seconds: float) -> None:
        # every evaluation re-plans: the elapsed time since the last plan shows how far reality drifted from it
        self._dirty |= self._measured()
        self.eval_s = seconds if self.eval_s is None else max(self.eval_s, seconds)

    def record_checkpoint(self, seconds: float) -> None:
        self._dirty |= self._measured()
        self.checkpoint_s = seconds if self.checkpoint_s is None else max(self.checkpoint_s, seconds)

    def _measured(self) -> bool:
        return any(len(s) >= self.measure_steps for s in self._samples.values())

    def _step_costs(self, done: int) -> list[tuple[float, float]]:
        """(training seconds, evaluation + checkpoint seconds after it) predicted for every step from ``done``
        to ``max_steps``; unmeasured evaluations and checkpoints are guessed from a step's time."""
        costs = []
        for step in range(done, self.max_steps):
            work = self.work(step)
            cost = self._cost_per_work(work)
            if cost is None:
                raise RuntimeError("TimeBudget: no step has been measured yet")
            train_s, extra_s = cost * work, 0.0
            if self.eval_every and (step + 1) % self.eval_every == 0:
                extra_s += self.eval_s if self.eval_s is not None else 3 * train_s
            if self.checkpoint_every and (step + 1) % self.checkpoint_every == 0:
                extra_s += self.checkpoint_s if self.checkpoint_s is not None else train_s
            costs.append((train_s, extra_s))
        return costs

    def plan_steps(self, done: int, elapsed_s: float) -> BudgetPlan:
        """The largest step count (``done + 1`` to ``max_steps``) predicted to end, final evaluation and save
        included, within the limit less its ``safety`` share; the schedule then decays over it."""
        allowed = self.limit_s * (1.0 - self.safety)
        costs = self._step_costs(done)
        step_s = costs[0][0] if costs else 0.0
        final_s = ((self.eval_s if self.eval_s is not None else 3 * step_s)
                   + (self.checkpoint_s if self.checkpoint_s is not None else step_s))
        best, predicted, running = done + 1, None, elapsed_s
        for i, (train_s, extra_s) in enumerate(costs):
            end_s = running + train_s + final_s  # ending here: the final evaluation replaces a mid-run one
            if predicted is not None and end_s > allowed:
                break
            best, predicted = done + i + 1, end_s
            running += train_s + extra_s
        self._dirty = False
        plan = BudgetPlan(done, best, step_s, predicted if predicted is not None else elapsed_s, self.limit_s)
        self.plan = plan
        self.plans.append(plan)
        return plan

    def state_dict(self) -> dict:
        return {"plans": [p.to_dict() for p in self.plans]}


def planned_steps(state: dict, default: int) -> int:
    """The schedule length a checkpoint's training state recorded (``default`` when it had no plan)."""
    value = state.get("planned_steps")
    return int(value) if isinstance(value, (int, float)) and math.isfinite(value) and value > 0 else default
