"""``ds profile train``: the steps ``ds train`` would run, timed plain and under ``torch.profiler``, interleaved.

The run is built by :func:`deepseek.train.lm.build_trainer` (the same config loading, data, model, precision choice,
optimizer and ``Trainer.train_step`` as ``ds train``; nothing is written to ``run_dir``). After ``warmup`` plain
steps, each of ``steps`` cycles runs four steps under one profiler with the schedule ``wait=2, warmup=1,
active=1``: a settling step (after the previous cycle's trace was processed, untimed), a *plain* step (the
profiler idle), a profiler warm-up step (discarded), and a *profiled* step (op names and times and the ``ds::``
scopes of :mod:`deepseek.ops.breakdown` only: recording shapes, FLOPs and memory as well cost the step 5-13 % on the
``small`` preset, most on the fastest, bf16 steps). The plain and the profiled step each follow an ordinary step, so
neither pays for the trace processing. Then one more step is recorded with shapes, FLOPs and memory
(``record_shapes``, ``with_flops``, ``profile_memory``) for the roofline points and the operand shapes in the
trace; its time is not used.

- tokens/s, step time and MFU come from the plain steps (median), so the profiler cannot inflate them;
- the breakdown comes from the profiled steps, the roofline from the shapes step; the trace holds both;
- the profiler's overhead is the median over cycles of profiled ÷ plain step time − 1: each pair of steps runs
  back to back, so a slow phase of a shared machine hits both.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from deepseek.config import ConfigError
from deepseek.ops.breakdown import CATEGORIES, OpPoint, accumulate_points, label_modules, scope, step_breakdowns
from deepseek.ops.flops import n_active_params, train_flops_per_token
from deepseek.ops.memory import cuda_memory, cuda_memory_history, peak_rss_bytes, rss_bytes
from deepseek.ops.peaks import machine_facts, measured_peaks
from deepseek.ops.report import summary_png, write_profile_json
from deepseek.ops.trace import merge_chrome_traces
from deepseek.train.config import TrainConfig
from deepseek.parallel import ParallelPlan
from deepseek.train.lm import build_trainer, distributed_plan

ProgressFn = Callable[[int, int], None]  # (steps done, steps in all)
SHAPES_STEPS = 3  # after the cycles: settle, the profiler's warm-up, the step recorded with shapes and FLOPs


def total_steps(steps: int, warmup: int) -> int:
    """The training steps a profile of ``steps`` cycles after ``warmup`` plain steps runs (for progress bars)."""
    return warmup + 4 * steps + SHAPES_STEPS


@dataclass
class TrainProfile:
    """What a profile of training measured: ``result`` is profile.json; ``points`` every product's roofline point."""

    result: dict
    points: list[OpPoint] = field(default_factory=list)


def expert_load(counts: Optional[torch.Tensor]) -> list[dict]:
    """Per MoE layer, from summed tokens-per-expert counts [layers, E]: the counts, their coefficient of
    variation (population std ÷ mean) and max ÷ mean (1.0 = perfectly balanced)."""
    if counts is None:
        return []
    rows = []
    for layer, row in enumerate(counts.double()):
        mean = float(row.mean())
        rows.append({"moe_layer": layer, "tokens_per_expert": [int(c) for c in row.tolist()],
                     "cv": float(row.std(unbiased=False)) / mean if mean else 0.0,
                     "max_over_mean": float(row.max()) / mean if mean else 0.0})
    return rows


def _tokens(batch) -> int:
    inputs = getattr(batch, "inputs", batch)
    return int(inputs.numel())


def profile_train(config: TrainConfig, *, steps: int = 5, warmup: int = 2, out: Path = Path("runs/profile"),
                  progress: Optional[ProgressFn] = None, peak_seconds: float = 1.5,
                  profile_memory: bool = True, plan: Optional[ParallelPlan] = None) -> TrainProfile:
    """Profile ``steps`` training steps of ``config`` after ``warmup`` plain ones (see the module's docstring).

    ``plan``: this rank's layout inside a torchrun job (:func:`profile_train_distributed`); every rank runs the same
    steps (their collectives pair up) and writes its own files, rank 0 into ``out``, rank r into ``out/rank{r}``."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0 (got {steps}, {warmup})")
    if config.parallel.mode == "parameter_server":
        raise ConfigError("ds profile train: parallel.mode=parameter_server is not supported (its workers do not "
                          "step together)")
    out = Path(out)
    if plan is not None and plan.rank != 0:
        out = out / f"rank{plan.rank}"
    trainer = build_trainer(config, plan)
    model, device = trainer.model, trainer.device
    total, done = total_steps(steps, warmup), 0

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    counts: list[Optional[torch.Tensor]] = [None]
    counting = [False]

    def count_routing(module, args, output) -> None:
        # Once per forward of the whole model (every micro-batch; never again for a checkpointed block's recompute).
        if counting[0]:
            stats = module.router_stats()
            if stats is not None:
                load = stats.tokens_per_expert.detach().float().cpu()
                counts[0] = load if counts[0] is None else counts[0] + load

    def run_step(measured: bool) -> tuple[float, int]:
        nonlocal done
        sync()
        start = time.perf_counter()
        counting[0] = measured
        with scope("data_loading"):
            batch = next(trainer.batches)
        trainer.train_step(batch)
        sync()
        took = time.perf_counter() - start
        counting[0] = False
        done += 1
        if progress is not None:
            progress(done, total)
        return took, _tokens(batch)

    hook = model.register_forward_hook(count_routing) if hasattr(model, "router_stats") else None
    scratch = Path(tempfile.mkdtemp(prefix="ds-profile-"))
    try:
        return _profile_cycles(trainer, config, run_step, counts, steps, warmup, out, scratch, peak_seconds,
                               profile_memory, plan)
    finally:
        if hook is not None:
            hook.remove()
        shutil.rmtree(scratch, ignore_errors=True)


def _profile_cycles(trainer, config: TrainConfig, run_step, counts, steps: int, warmup: int, out: Path,
                    scratch: Path, peak_seconds: float, profile_memory: bool,
                    plan: Optional[ParallelPlan]) -> TrainProfile:
    """The warm-up, the paired cycles under the profiler, then profile.json's figures and the output files."""
    model, device = trainer.model, trainer.device
    seq_len = config.data.schedule()[-1][1]
    for _ in range(warmup):
        run_step(False)

    plain, profiled, rss, tokens = [], [], [], []
    breakdowns, points, traces = [], {}, []

    def keep_trace(prof) -> None:
        path = scratch / f"cycle{len(traces)}.json"
        prof.export_chrome_trace(str(path))
        traces.append(path)

    def on_cycle_ready(prof) -> None:
        breakdowns.extend(step_breakdowns(prof.events(), device_time=device.type == "cuda"))
        keep_trace(prof)

    def on_shapes_ready(prof) -> None:
        accumulate_points(prof.events(), points)
        keep_trace(prof)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out.mkdir(parents=True, exist_ok=True)
    with cuda_memory_history(device, out / "memory_snapshot.pickle") as snapshot:
        with profile(activities=activities, schedule=schedule(wait=2, warmup=1, active=1, repeat=steps),
                     on_trace_ready=on_cycle_ready) as prof:
            for _ in range(steps):
                run_step(False)                    # wait: settles after the last cycle's trace was processed
                prof.step()
                took, n = run_step(True)           # wait: the plain step, timed
                plain.append(took)
                tokens.append(n)
                rss.append(rss_bytes())
                prof.step()
                run_step(False)                    # the profiler's warm-up
                prof.step()
                with label_modules(model), _scoped_clipping(trainer):
                    took, n = run_step(True)       # recorded
                profiled.append(took)
                tokens.append(n)
                rss.append(rss_bytes())
                prof.step()
        # One step recorded with shapes, FLOPs and memory: the roofline points and the trace's operand shapes.
        with profile(activities=activities, record_shapes=True, with_flops=True, profile_memory=profile_memory,
                     schedule=schedule(wait=1, warmup=1, active=1), on_trace_ready=on_shapes_ready) as prof:
            for _ in range(SHAPES_STEPS):
                with label_modules(model), _scoped_clipping(trainer):
                    run_step(False)
                prof.step()

    precision = trainer.precision.precision
    world_size = plan.world_size if plan is not None else 1
    memory = {"peak_rss_bytes": peak_rss_bytes(), "steady_rss_bytes": int(statistics.median(rss)),
              **cuda_memory(device), "cuda_snapshot": snapshot["snapshot"]}
    peaks = measured_peaks(device, peak_seconds)  # after the high-water mark is read: its operands are not the run's
    step_seconds = statistics.median(plain)
    tokens_per_step = int(statistics.median(tokens))
    tokens_per_s = tokens_per_step / step_seconds
    flops = train_flops_per_token(model, seq_len)
    peak = peaks["matmul_flops"].get(precision)
    mfu = flops["total"] * tokens_per_s / peak if peak else None
    mfu_6n = flops["dense"] * tokens_per_s / peak if peak else None
    ratios = [p / q - 1.0 for p, q in zip(profiled, plain)]
    mean_breakdown = {c: statistics.fmean(b.seconds[c] for b in breakdowns) for c in CATEGORIES} if breakdowns else {}
    result = {
        "kind": "train",
        "machine": machine_facts(device),
        "precision": precision,
        "peaks": peaks,
        "config": {"model": {k: getattr(model.config, k) for k in ("d_model", "n_layers", "n_heads", "head_dim",
                                                                     "n_routed_experts", "top_k", "vocab_size")},
                   "batch_size": config.batch_size, "seq_len": seq_len,
                   "micro_batch": config.micro_batch, "compile": config.compile, "steps": steps, "warmup": warmup},
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_s,
        "step_seconds": step_seconds,
        "plain_step_seconds": plain,
        "profiled_step_seconds": profiled,
        "n_active_params": n_active_params(model),
        "flops_per_token": flops["total"],
        "flops_per_token_terms": {"6_n_active": flops["dense"], "attention_12_l_h_dh_t": flops["attention"]},
        "achieved_flops_per_s": flops["total"] * tokens_per_s,
        "mfu": mfu,
        "mfu_6n": mfu_6n,
        "overhead": statistics.median(ratios),
        "overhead_per_cycle": ratios,
        "memory": memory,
        "breakdown": mean_breakdown,
        "breakdown_step_seconds": statistics.fmean(b.step_seconds for b in breakdowns) if breakdowns else None,
        "expert_load": expert_load(counts[0]),
        "top_ops": [p.to_dict() for p in sorted(points.values(), key=lambda p: -p.seconds)[:12]],
        # tokens_per_s, mfu and the breakdown are this rank's (per device); the job moves world_size times the tokens
        "world_size": world_size,
        "rank": plan.rank if plan is not None else 0,
        "job_tokens_per_s": tokens_per_s * world_size,
        "communication_note": ("collectives as this rank's profiler saw them (gloo runs them on its own threads: "
                               "the step's wait for them is in the other categories' time)" if world_size > 1
                               else "0: one process"),
    }
    result["outputs"] = write_outputs(result, traces, out)
    return TrainProfile(result, list(points.values()))


def profile_train_distributed(config: TrainConfig, **options) -> TrainProfile:
    """:func:`profile_train` on this rank of a torchrun job (``ds profile train --nproc N`` re-launches itself under
    torchrun, as ``ds train --nproc N`` does): the same process group, layout and data preparation as training."""
    with distributed_plan(config) as plan:
        try:
            return profile_train(config, plan=plan, **options)
        finally:
            plan.close()  # DDP reducers and pipeline stages go before the process group


class _scoped_clipping:
    """Put the trainer's gradient clipping into the ``optimizer`` scope while a step is profiled."""

    def __init__(self, trainer):
        self.trainer = trainer

    def __enter__(self):
        clipper = self.original = self.trainer.clipper

        def clip(parameters):
            with scope("optimizer"):
                return clipper(parameters)

        self.trainer.clipper = clip
        return self

    def __exit__(self, *_):
        self.trainer.clipper = self.original


def write_outputs(result: dict, traces: list[Path], out: Path) -> dict[str, str]:
    """trace.json (every profiled step), summary.png and profile.json in ``out``; returns their paths."""
    paths = {"trace": out / "trace.json", "summary_png": out / "summary.png", "profile_json": out / "profile.json"}
    merge_chrome_traces(traces, paths["trace"])
    summary_png(result, paths["summary_png"])
    outputs = {k: str(v) for k, v in paths.items()}
    write_profile_json({**result, "outputs": outputs}, paths["profile_json"])
    return outputs
