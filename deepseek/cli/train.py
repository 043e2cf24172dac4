"""``ds train CONFIG [key=value ...]``: train a language model from a YAML config."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _fields_help() -> str:
    from deepseek.train.config import describe_fields

    lines, section = [], ""
    for key, default, text in describe_fields():
        head = key.split(".")[0] if "." in key else ""
        if head != section:
            section = head
            lines.append(f"[bold]{head}:[/bold]")
        lines.append(f"  [cyan]{key}[/cyan] = {default}  {text}")
    return "Config fields (in the YAML file, or key=value on the command line):\n\n" + "\n\n".join(lines)


def register(app: typer.Typer) -> None:
    app.command("train", epilog=_fields_help())(train_command)


def train_command(
    config: Optional[Path] = typer.Argument(None, help="A YAML training config (e.g. configs/tiny.yaml); "
                                                       "omitted = the defaults."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. max_steps=20 "
                                                               "model.n_routed_experts=16."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest valid checkpoint in run_dir."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Processes on this machine: >1 re-launches this command "
                                                        "under `torchrun --standalone` (the parallel: section; "
                                                        "gloo on CPU)."),
    max_restarts: int = typer.Option(0, "--max-restarts", min=0, help="With --nproc: torchrun restarts of a "
                                                                      "failed job (it resumes from its checkpoint)."),
) -> None:
    """Train a MoE language model: metrics.jsonl, TensorBoard, checkpoints and the final model in run_dir."""
    import os

    from deepseek.config import ConfigError
    from deepseek.train.lm import train_lm
    from deepseek.train.config import load_train_config

    extra = ["checkpoint.resume=true"] if resume else []
    cfg = load_train_config(config, [*(overrides or []), *extra])  # a bad config fails here, before any launch
    args = ["train", *([str(config)] if config is not None else []), *(overrides or []),
            *(["--resume"] if resume else [])]
    if cfg.parallel.mode == "parameter_server" and nproc > 1:
        from deepseek.train.parameter_server import launch_parameter_server

        if max_restarts:
            raise ConfigError("--max-restarts is for torchrun jobs; parameter_server mode survives lost workers "
                              "itself (docs/parameter_server.md)")
        raise typer.Exit(launch_parameter_server(nproc, args))  # not torchrun: a dead worker must not end the job
    if nproc > 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        from deepseek.parallel.launch import relaunch

        raise typer.Exit(relaunch(nproc, args, max_restarts=max_restarts))
    result = train_lm(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    line = f"trained {result.step} steps in {result.elapsed_s:.0f}s, final loss {result.loss:.4f}"
    if result.final_eval:
        line += f", val loss {result.final_eval['val_loss']:.4f} (ppl {result.final_eval['val_ppl']:.2f})"
    typer.echo(line)
    typer.echo(f"model: {Path(cfg.run_dir) / 'model'}   metrics: {Path(cfg.run_dir) / 'metrics.jsonl'}")
