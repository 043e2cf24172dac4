"""The training loop: any ``nn.Module`` + a loss function + batches, with everything a run needs around it.

AdamW + warm-up/cosine schedule, gradient accumulation, bf16/fp16 mixed precision, fixed or dynamic gradient
clipping, MoE load balancing, metrics.jsonl + TensorBoard + a progress bar, periodic evaluation, atomic
checkpoints and exact resume. Language models get their wiring from :mod:`deepseek.train.lm`; an image or
tabular model passes its own ``loss_fn`` (see examples/digits_cnn.py).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from deepseek.compile import jit
from deepseek.config import ConfigError, to_dict
from deepseek.hardware import PrecisionChoice, choose_precision, hardware_profile, warn_once
from deepseek.nn.moe import update_router_biases
from deepseek.atomic import write_json_atomically
from deepseek.train.budget import TimeBudget, WorkFn, planned_steps
from deepseek.train.checkpoint import is_sharded_checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from deepseek.train.clipping import GradientClipper
from deepseek.train.metrics import MetricsLog, StepProgress
from deepseek.parallel import ParallelPlan
from deepseek.train.config import TrainConfig
from deepseek.train.optim import build_optimizer, build_scheduler, set_schedule_length
from deepseek.train.step import ForwardBackward, LossFn, move_batch, split_batch

TRIAL_BATCHES = 4  # precision=auto's trial on a CPU with native bf16: one warm-up batch, three timed
EvalFn = Callable[[nn.Module], dict[str, float]]


class StepMetrics:
    """``loss_fn`` wrapped so that the figures it exposes reach metrics.jsonl: after each call the loss function's
    ``last`` attribute (a dict of floats, e.g. DPO's ``rewards/accuracy``, GRPO's ``kl``), when it has one, is
    added up; :meth:`take` returns the means over the micro-batches since the last take, and starts afresh."""

    def __init__(self, loss_fn: LossFn):
        self.loss_fn = loss_fn
        self._sums: dict[str, float] = {}
        self._calls = 0

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        loss = self.loss_fn(model, batch)
        last = getattr(self.loss_fn, "last", None)
        if last:
            self._calls += 1
            for name, value in last.items():
                self._sums[name] = self._sums.get(name, 0.0) + float(value)
        return loss

    def take(self) -> dict[str, float]:
        means = {name: total / self._calls for name, total in self._sums.items()} if self._calls else {}
        self._sums, self._calls = {}, 0
        return means


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here; use device=cpu or auto")
    return device


def resolve_precision(precision: str, device: torch.device) -> PrecisionChoice:
    """What ``precision`` (auto, fp32, bf16, fp16) means on ``device``, chosen by what the device does fast
    (:mod:`deepseek.hardware`); an explicit bf16 where it is slow warns once, fp16 on a CPU is a ConfigError."""
    try:
        choice = choose_precision(precision, hardware_profile(device, measure=precision in ("auto", "bf16")))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    warn_once(choice.warning)
    return choice


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of a precision setting on a device (None = fp32); see :func:`resolve_precision`."""
    return resolve_precision(precision, device).autocast_dtype


def count_items(batch: Any) -> int:
    """Tokens in an LM batch (``inputs.numel()``), else rows: what the throughput counts."""
    inputs = getattr(batch, "inputs", None)
    if isinstance(inputs, torch.Tensor):
        return inputs.numel()
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return first.shape[0] if isinstance(first, torch.Tensor) else 1


def save_state_dict(model: nn.Module, path: Path) -> None:
    """The default final save of a plain module: ``path/model.safetensors``, written atomically."""
    from safetensors.torch import save_file

    from deepseek.atomic import write_atomically
    from deepseek.models.directory import _state_for_saving

    state = {k: v.clone() for k, v in _state_for_saving(model).items()}  # tied weights: safetensors wants no sharing
    write_atomically(path, lambda folder: save_file(state, str(folder / "model.safetensors")))


class _NoLog:
    """What ranks other than 0 log to: nothing."""

    def truncate_after(self, step: int) -> None:
        pass

    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class TrainResult:
    step: int
    loss: float
    elapsed_s: float
    stopped_early: bool = False
    resumed_from: Optional[int] = None
    final_eval: Optional[dict[str, float]] = None


class Trainer:
    """Trains ``model`` on ``batches`` with ``loss_fn(model, batch) -> scalar loss``.

    ``batches`` is an iterator of batches; if it has ``state_dict()``/``load_state_dict()`` (like
    :class:`deepseek.data.TokenLoader`) its position is checkpointed too, so a resumed run sees exactly the
    batches the uninterrupted run would have seen. A ``loss_fn`` with a ``last`` attribute (a dict of floats set
    by each call) has those figures, averaged over the step's micro-batches, logged with the loss
    (:class:`StepMetrics`). ``eval_fn(model) -> {"val_loss": …}`` runs every
    ``eval_every`` steps and at the end. ``save_model(model, path)`` writes the final model to
    ``run_dir/model`` (default: ``model.safetensors`` of the state dict in that folder); ``tokenizer`` rides
    along in checkpoints of deepseek models.

    Under torchrun, ``parallel`` (a :class:`~deepseek.parallel.MeshPlan` from :func:`deepseek.parallel.build_plan`;
    default: one process) applies the layout and answers the loop's questions, given the model, the step function
    (:class:`~deepseek.train.step.ForwardBackward`) and the state to checkpoint, never the Trainer;
    ``batches`` yields this rank's share of each global batch. The logged loss is averaged over the ranks,
    and only rank 0 writes metrics and the model.

    ``precision="auto"`` picks bf16 on a CPU only where its products are measurably faster than fp32; given
    ``trial_loss_fn`` (a loss without side effects, e.g. the plain LM loss), that choice is checked by timing a
    forward + backward of a copy of the model on the first batches in both precisions
    (:func:`deepseek.train.calibrate.precision_by_trial`).
    """

    def __init__(self, model: nn.Module, config: TrainConfig, *, batches: Iterator[Any], loss_fn: LossFn,
                 eval_fn: Optional[EvalFn] = None, tokenizer: Any = None,
                 save_model: Optional[Callable[[nn.Module, Path], None]] = None, throughput_unit: str = "tok/s",
                 parallel: Optional[ParallelPlan] = None, work_per_step: Optional[WorkFn] = None,
                 clock: Callable[[], float] = time.perf_counter, trial_loss_fn: Optional[LossFn] = None):
        self.config = config
        self.device = resolve_device(config.device)
        self.precision = resolve_precision(config.precision, self.device)
        self.amp_dtype = self.precision.autocast_dtype
        self.work_per_step, self.clock = work_per_step, clock
        self.model = model.to(self.device)
        self.batches, self.loss_fn, self.eval_fn = batches, loss_fn, eval_fn
        self.tokenizer, self.save_model, self.unit = tokenizer, save_model or save_state_dict, throughput_unit
        self.run_dir = Path(config.run_dir)
        if config.gradient_checkpointing:
            if not hasattr(model, "gradient_checkpointing"):
                raise ConfigError("gradient_checkpointing=true needs a model with a `gradient_checkpointing` flag")
            model.gradient_checkpointing = True
        self.parallel = parallel or ParallelPlan()
        self.rank, self.world_size, self.is_main = self.parallel.rank, self.parallel.world_size, self.parallel.is_main
        self.accum = config.batch_size // config.micro_batch
        if trial_loss_fn is not None and self._precision_needs_trial():  # on the plain model, before any layout
            self.precision = self._precision_by_trial(model, batches, trial_loss_fn)
            self.amp_dtype = self.precision.autocast_dtype
        self.parallel_model = self.parallel.wrap(self.model)
        self.optimizer = build_optimizer(model, config.optimizer, device_type=self.device.type)
        self.scheduler = build_scheduler(self.optimizer, config.schedule, config.max_steps)
        self.clipper = GradientClipper(config.clip, norm_fn=self.parallel.grad_norm_fn())
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        forward_model = jit(self.parallel_model) if config.compile else self.parallel_model
        self.step_metrics = StepMetrics(loss_fn)
        self.step_fn = ForwardBackward(forward_model, self.step_metrics, self.device.type, self.amp_dtype,
                                       self.scaler, aux_model=self.model)
        self.optimizer.register_step_pre_hook(lambda *_: self._before_optimizer_step())
        self.step = 0
        self.planned_steps = config.max_steps  # a time budget may shorten the schedule (deepseek.train.budget)

    # -- precision ------------------------------------------------------------------------------------

    def _precision_needs_trial(self) -> bool:
        """``auto`` picked bf16 on a CPU from its products alone: worth checking on the model itself (eager only)."""
        return (self.config.precision == "auto" and self.device.type == "cpu" and self.precision.precision == "bf16"
                and not self.config.compile)

    def _precision_by_trial(self, model: nn.Module, batches: Any, loss_fn: LossFn) -> PrecisionChoice:
        """Time a forward + backward of the first micro-batch in fp32 and bf16 (on a copy of the model); every rank
        takes bf16 only if every rank found it faster. Batches are peeked where the loader can rewind (else the
        product probe's choice stands)."""
        from deepseek.train.calibrate import precision_by_trial

        if not (hasattr(batches, "state_dict") and hasattr(batches, "load_state_dict")):
            return self.precision
        position = batches.state_dict()
        peeked = [next(batches) for _ in range(TRIAL_BATCHES)]
        batches.load_state_dict(position)
        micro = [move_batch(split_batch(batch, self.accum)[0], self.device) for batch in peeked]
        fp32 = choose_precision("fp32", hardware_profile(self.device, measure=False))
        choice = precision_by_trial(model, loss_fn, micro, fp32, self.precision)
        if self.parallel.min_over_ranks(int(choice.precision == "bf16")) == 0 and choice.precision == "bf16":
            choice = dataclasses.replace(fp32, requested="auto", reason=choice.reason + "; another rank found fp32 faster")
        return dataclasses.replace(choice, requested="auto")

    # -- one step ------------------------------------------------------------------------------------

    def _before_optimizer_step(self) -> None:
        # e.g. every rank sums the experts' load over the ranks, so that the bias updates below stay identical
        self.parallel.before_optimizer_step(self.model)
        # DeepSeek-V3's aux-loss-free balancing: nudge sigmoid router biases once per optimizer step, before it.
        update_router_biases(self.model)

    def train_step(self, batch: Any) -> dict[str, float]:
        """Forward/backward over the micro-batches of one global batch, clip, step. Returns the step's figures."""
        self.model.train()
        micro_batches = [move_batch(micro, self.device) for micro in split_batch(batch, self.accum)]
        loss_sum, aux_sum = self.parallel.forward_backward(self.parallel_model, micro_batches, self.step_fn)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.clipper(self.model.parameters())
        lr = self.optimizer.param_groups[0]["lr"]
        finite = math.isfinite(clip.grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step itself on inf/nan gradients
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        figures = {"loss": loss_sum / len(micro_batches), "lr": lr, "grad_norm": clip.grad_norm,
                   "clip_threshold": clip.threshold, "clipped": clip.clipped, "skipped": not finite}
        if aux_sum:
            figures["aux_loss"] = aux_sum / len(micro_batches)
        extra = {name: value for name, value in self.step_metrics.take().items() if name not in figures}
        figures.update(extra)
        figures = self.parallel.mean_over_ranks(figures, ("loss", "aux_loss", *extra))
        stats = self.model.router_stats() if hasattr(self.model, "router_stats") else None
        if stats is not None:
            figures["expert_load_max_over_mean"] = float(stats.max_over_mean.max())
        return figures

    # -- the run -------------------------------------------------------------------------------------

    def _training_state(self) -> dict[str, Any]:
        state = {"step": self.step, "clipper": self.clipper.state_dict(), "config": to_dict(self.config),
                 # only a time budget's plan is kept: a resumed run with a larger max_steps goes on to it otherwise
                 "planned_steps": self.planned_steps if self.planned_steps != self.config.max_steps else None}
        if hasattr(self.batches, "state_dict"):
            state["data"] = self.batches.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def save_checkpoint(self) -> Path:
        """Rank 0 writes the checkpoint (replicas are identical; sharded layouts write their own format);
        the others wait for it at a barrier."""
        states = {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler,
                  "state": self._training_state()}
        sharded = self.parallel.save_checkpoint(self.run_dir / "checkpoints", self.step, states,
                                                tokenizer=self.tokenizer, keep_last=self.config.checkpoint.keep_last)
        if sharded is not None:
            return sharded
        self.parallel.barrier()
        path = self.run_dir / "checkpoints"
        if self.is_main:
            path = save_checkpoint(path, self.step, model=self.model, optimizer=self.optimizer,
                                   scheduler=self.scheduler, state=self._training_state(), tokenizer=self.tokenizer,
                                   keep_last=self.config.checkpoint.keep_last)
        self.parallel.barrier()
        return path

    def resume(self) -> Optional[int]:
        """Restore the newest valid checkpoint of the run (skipping corrupt ones); returns its step or None."""
        states = {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler}
        try:
            found = self.parallel.resume(self.run_dir / "checkpoints", states)
            return None if found is None else self.restore_training_state(found[1]["state"], found[0])
        except NotImplementedError:
            pass
        path = latest_checkpoint(self.run_dir / "checkpoints")
        if path is None:
            return None
        if is_sharded_checkpoint(path):  # written by N ranks with DCP: read into this layout, whatever it is
            # imported here: torch.distributed.checkpoint pulls in DTensor, half a second of every `ds` start
            from deepseek.parallel.checkpoint import load_sharded_checkpoint

            state = load_sharded_checkpoint(path, states, verify=False,
                                            local_shards=self.parallel.checkpoint_shards(self.model))["state"]
        else:
            state = load_checkpoint(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                    verify=False)  # latest_checkpoint just verified it
        return self.restore_training_state(state, path)

    def restore_training_state(self, state: dict[str, Any], path: Path) -> int:
        """After the model, optimizer and scheduler of checkpoint ``path`` are loaded: the step, clipper, data
        position and loss scaler from its ``state``; returns the step."""
        self.step = int(state["step"])
        self.clipper.load_state_dict(state["clipper"])
        # The same run goes on with its time budget's plan; a run resumed to a new max_steps plans afresh.
        if state.get("config", {}).get("max_steps") == self.config.max_steps:
            self._set_planned_steps(min(planned_steps(state, self.config.max_steps), self.config.max_steps))
        if "data" in state and hasattr(self.batches, "load_state_dict"):
            self.batches.load_state_dict(state["data"])
        elif hasattr(self.batches, "state_dict"):
            warnings.warn(f"checkpoint {path} has no data position; the data order restarts")
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        return self.step

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.eval_fn is None:
            return {}
        results = self.parallel.evaluate(self.model, self._eval_in_autocast)
        if results is not None:
            return results
        was_training = self.model.training
        self.model.eval()
        try:
            return self._eval_in_autocast(self.model)
        finally:
            self.model.train(was_training)

    def _eval_in_autocast(self, model: nn.Module) -> dict[str, float]:
        with self.step_fn.autocast():
            return self.eval_fn(model)

    def fit(self) -> TrainResult:
        cfg = self.config
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        resumed = self.resume() if cfg.checkpoint.resume else None
        log = MetricsLog(self.run_dir, tensorboard=cfg.tensorboard, metrics_port=cfg.metrics_port,
                         metrics_host=cfg.metrics_host) if self.is_main else _NoLog()
        log.truncate_after(self.step)
        progress = StepProgress(self.planned_steps, self.step, enabled=cfg.progress and self.is_main, unit=self.unit)
        if resumed is not None:
            progress.print(f"resumed from step {resumed}")
        progress.print(f"precision: {self.precision.precision} ({self.precision.reason})")
        budget = self._time_budget()
        self._write_run_info(budget)
        clock = self.clock
        started = clock()
        window_items, window_time = 0, 0.0
        figures: dict[str, float] = {"loss": float("nan")}
        stopped_early = False
        last_checkpoint = self.step if resumed is not None else None
        final_eval = None
        try:
            while self.step < self.planned_steps:
                t0 = clock()
                batch = next(self.batches)
                figures = self.train_step(batch)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                took = clock() - t0
                window_time += took
                window_items += count_items(batch) * self.parallel.data_parallel_size  # the global batch
                if budget is not None:
                    budget.record_step(self.step - 1, took)
                if self.step % cfg.log_every == 0 or self.step == self.planned_steps:
                    throughput = window_items / window_time if window_time else 0.0
                    key = "tokens_per_s" if self.unit == "tok/s" else "samples_per_s"
                    record = {"step": self.step, **figures, key: round(throughput, 1),
                              "seq_len": getattr(batch, "seq_len", None),
                              "elapsed_s": round(clock() - started, 2)}
                    log.log({k: v for k, v in record.items() if v is not None})
                    progress.update(self.step, {**figures, "throughput": throughput})
                    window_items, window_time = 0, 0.0
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.planned_steps:
                    t0 = clock()
                    self._log_eval(log, progress)
                    if budget is not None:
                        budget.record_eval(clock() - t0)
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    t0 = clock()
                    self.save_checkpoint()
                    last_checkpoint = self.step
                    if budget is not None:
                        budget.record_checkpoint(clock() - t0)
                if budget is not None and budget.wants_plan():
                    self._plan(budget, clock() - started, progress)
                limit = cfg.time_limit_minutes * 60
                if limit and self.parallel.any_rank(clock() - started > limit) and self.step < self.planned_steps:
                    progress.print(f"time limit of {cfg.time_limit_minutes:g} min reached at step {self.step}")
                    stopped_early = True
                    break
            final_eval = self._log_eval(log, progress)
            if last_checkpoint != self.step and (cfg.checkpoint.save_final or stopped_early):
                self.save_checkpoint()
            if cfg.checkpoint.save_final:
                full = self.parallel.full_model(self.model)  # collective: sharded layouts gather here
                if self.is_main:
                    self.save_model(full, self.run_dir / "model")
            self.parallel.barrier()
        finally:
            progress.close()
            log.close()
        return TrainResult(self.step, figures["loss"], clock() - started, stopped_early, resumed, final_eval)

    # -- the time budget -----------------------------------------------------------------------------

    def _time_budget(self) -> Optional[TimeBudget]:
        """A planner for ``time_limit_minutes`` runs whose schedule should end at the limit (else None)."""
        cfg = self.config
        if not cfg.time_limit_minutes or not cfg.schedule.fit_time_limit:
            return None
        return TimeBudget(cfg.time_limit_minutes * 60, cfg.max_steps, work=self.work_per_step,
                          eval_every=cfg.eval_every if self.eval_fn is not None else 0,
                          checkpoint_every=cfg.checkpoint.every)

    def _set_planned_steps(self, steps: int) -> None:
        self.planned_steps = steps
        set_schedule_length(self.scheduler, self.config.schedule, steps)

    def _plan(self, budget: TimeBudget, elapsed_s: float, progress: StepProgress) -> None:
        """Re-plan the run's length from the budget's measurements; every rank takes the shortest plan."""
        plan = budget.plan_steps(self.step, elapsed_s)
        steps = self.parallel.min_over_ranks(plan.steps)
        if steps != self.planned_steps:
            self._set_planned_steps(steps)
            progress.set_total(steps)
        progress.print(plan.describe())
        self._write_run_info(budget)

    def _write_run_info(self, budget: Optional[TimeBudget]) -> None:
        """``run_dir/trainer.json``: what this run chose and why (precision, hardware, time-budget plans)."""
        if not self.is_main:
            return
        info = {"precision": self.precision.to_dict(),
                "hardware": hardware_profile(self.device, measure=False).to_dict(),
                "max_steps": self.config.max_steps, "planned_steps": self.planned_steps,
                "time_budget": budget.state_dict() if budget is not None else None}
        write_json_atomically(self.run_dir / "trainer.json", info)

    def _log_eval(self, log: MetricsLog, progress: StepProgress) -> Optional[dict[str, float]]:
        results = self.evaluate()
        if not results:
            return None
        log.log({"step": self.step, **results})
        progress.print("eval step {}: {}".format(self.step, "  ".join(f"{k} {v:.4f}" for k, v in results.items())))
        return results
