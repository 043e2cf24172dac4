"""``ds profile``: where a training step or a generated token goes, against this device's measured ceilings."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import typer

profile_app = typer.Typer(no_args_is_help=True, help="Profile training steps or generation: time breakdown, MFU/MBU "
                                                     "against measured peaks, trace.json, summary.png, profile.json.")


def register(app: typer.Typer) -> None:
    app.add_typer(profile_app, name="profile")


def _quiet_profiler() -> None:
    # One cycle's events are read when it ends (on_trace_ready), so torch's advice to accumulate them is moot.
    warnings.filterwarnings("ignore", message=".*Profiler clears events at the end of each cycle.*")


def _print_outputs(result: dict) -> None:
    from deepseek.ops.report import print_report

    print_report(result)
    outputs = result["outputs"]
    typer.echo(f"trace: {outputs['trace']} (chrome://tracing or ui.perfetto.dev)   summary: {outputs['summary_png']}"
               f"   numbers: {outputs['profile_json']}")


@profile_app.command("train")
def train_command(
    config: Optional[Path] = typer.Argument(None, help="A YAML training config, as for `ds train` (omitted = the "
                                                       "defaults)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, as for `ds train`."),
    steps: int = typer.Option(5, "--steps", min=1, help="Profiled steps (each paired with one plain step)."),
    warmup: int = typer.Option(2, "--warmup", min=0, help="Plain steps first (kernels, allocator, routing settle)."),
    out: Path = typer.Option(Path("runs/profile"), "--out", help="Folder for trace.json, summary.png, profile.json."),
    peak_seconds: float = typer.Option(1.5, "--peak-seconds", min=0.05, help="Time spent measuring this device's "
                                       "matmul peaks and memory bandwidth (each; best of 3 bursts)."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Processes on this machine: >1 re-launches this command "
                                                        "under `torchrun --standalone`, as `ds train --nproc` does "
                                                        "(the config's parallel: section; gloo on CPU); each rank is "
                                                        "profiled, rank 0 prints."),
) -> None:
    """Profile training steps of a `ds train` config: breakdown, tokens/s, MFU, memory, expert load."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from deepseek.config import ConfigError
    from deepseek.ops.profile_train import profile_train, profile_train_distributed, total_steps
    from deepseek.train.config import load_train_config

    cfg = load_train_config(config, list(overrides or []))  # a bad config fails here, before any launch
    if nproc > 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        from deepseek.parallel.launch import relaunch

        if cfg.parallel.mode == "parameter_server":
            raise ConfigError("ds profile train: parallel.mode=parameter_server is not supported (its workers do not "
                              "step together)")
        args = ["profile", "train", *([str(config)] if config is not None else []), *(overrides or []),
                "--steps", str(steps), "--warmup", str(warmup), "--out", str(out),
                "--peak-seconds", str(peak_seconds)]  # no --nproc: torchrun would take it for its own
        raise typer.Exit(relaunch(nproc, args))
    _quiet_profiler()
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a rank of the torchrun job: no progress bar, rank 0 prints
        result = profile_train_distributed(cfg, steps=steps, warmup=warmup, out=out, peak_seconds=peak_seconds).result
        if result["rank"] == 0:
            _print_outputs(result)
        return
    with Progress(TextColumn("profiling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True) as bar:
        task = bar.add_task("steps", total=total_steps(steps, warmup))
        result = profile_train(cfg, steps=steps, warmup=warmup, out=out, peak_seconds=peak_seconds,
                               progress=lambda done, total: bar.update(task, completed=done)).result
    _print_outputs(result)


@profile_app.command("generate")
def generate_command(
    model_dir: Path = typer.Argument(..., help="A model directory (config.json, model.safetensors, tokenizer.json)."),
    batch: int = typer.Option(1, "--batch", min=1, help="Sequences generated together."),
    prompt_len: int = typer.Option(128, "--prompt-len", min=1, help="Prompt tokens per sequence (random ids)."),
    new_tokens: int = typer.Option(32, "--new-tokens", min=2, help="Tokens generated per sequence."),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Plain generations timed (medians)."),
    precision: str = typer.Option("auto", help="auto (what decodes fastest here, as ds generate), fp32 or bf16."),
    out: Path = typer.Option(Path("runs/profile"), "--out", help="Folder for trace.json, summary.png, profile.json."),
) -> None:
    """Profile generation: prefill vs decode, per-step time against the weight-streaming floor, KV-cache bytes."""
    from deepseek.ops.profile_generate import profile_generate

    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: not a model directory")
    result = profile_generate(model_dir, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, rounds=rounds,
                              precision=precision, out=out)
    _print_outputs(result)
