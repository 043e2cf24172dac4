"""``ds finetune``: data for fine-tuning (instruction, preference and prompt sets)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

finetune_app = typer.Typer(no_args_is_help=True, help="Fine-tuning data and runs.")


def register(app: typer.Typer) -> None:
    app.add_typer(finetune_app, name="finetune")


@finetune_app.command("prepare-examples")
def prepare_examples_command(
    out: Path = typer.Argument(..., help="Output directory (six .jsonl files and manifest.json)."),
    seed: int = typer.Option(0, help="Seed of the mutations that make the rejected side of preference pairs."),
    module: Optional[list[str]] = typer.Option(None, "--module", help="Only this module and its submodules "
                                                                      "(repeatable; default: the whole stdlib)."),
    heldout_fraction: float = typer.Option(0.1, help="Share of modules held out (the pre-training split's hash)."),
) -> None:
    """Instruction chats, preference pairs and doctest prompts from the standard library, held out by module."""
    from deepseek.data.instructions import write_examples

    manifest = write_examples(out, seed=seed, modules=module or None, heldout_fraction=heldout_fraction)
    for file, count in manifest["counts"].items():
        typer.echo(f"{file}: {count:,}")
    typer.echo(f"wrote {out}")


def _fields_help() -> str:
    from deepseek.finetune.config import FinetuneConfig
    from deepseek.train.config import describe_fields

    rows = describe_fields(FinetuneConfig)
    return "Config fields (in the YAML file, or key=value on the command line):\n\n" + "\n\n".join(
        f"  [cyan]{key}[/cyan] = {default}  {text}" for key, default, text in rows)


@finetune_app.command("run", epilog=_fields_help())
def run_command(
    config: Optional[Path] = typer.Argument(None, help="A YAML fine-tuning config (e.g. configs/finetune-lora.yaml)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. init=runs/q/model "
                                                               "max_steps=20 lora.r=8."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest valid checkpoint in run_dir."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Processes on this machine: >1 re-launches this command "
                                                        "under `torchrun --standalone` (data parallel, gloo on CPU; "
                                                        "batch_size is the global batch)."),
) -> None:
    """Fine-tune a model directory (method: sft, dpo, reward, grpo or mixed; LoRA with a `lora:` section, else
    full): run_dir/adapter, run_dir/model or run_dir/reward, plus metrics.jsonl and checkpoints."""
    import os

    from deepseek.config import ConfigError
    from deepseek.finetune.config import load_finetune_config
    from deepseek.finetune.run import finetune, result_path

    cfg = load_finetune_config(config, [*(overrides or []), *(["checkpoint.resume=true"] if resume else [])])
    cfg.check_paths()  # a bad config fails here, before any launch
    if nproc > 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        if cfg.batch_size % nproc or (cfg.micro_batch_size or cfg.batch_size) % nproc:
            raise ConfigError(f"batch_size ({cfg.batch_size}) and micro_batch_size ({cfg.micro_batch_size}) must be "
                              f"multiples of --nproc ({nproc}): each process trains on its share of every batch")
        from deepseek.parallel.launch import relaunch

        args = ["finetune", "run", *([str(config)] if config is not None else []), *(overrides or []),
                *(["--resume"] if resume else [])]
        raise typer.Exit(relaunch(nproc, args))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from deepseek.finetune.distributed import finetune_distributed

        result = finetune_distributed(cfg)
        if int(os.environ.get("RANK", "0")) != 0:
            return
    else:
        result = finetune(cfg)
    line = f"fine-tuned {result.step} steps in {result.elapsed_s:.0f}s, final loss {result.loss:.4f}"
    if result.final_eval:
        line += ", " + ", ".join(f"{name} {value:.4f}" for name, value in result.final_eval.items())
    typer.echo(line)
    typer.echo(f"{result_path(cfg).name}: {result_path(cfg)}   metrics: {Path(cfg.run_dir) / 'metrics.jsonl'}")


@finetune_app.command("report")
def report_command(
    run_dir: Path = typer.Argument(..., help="The run_dir of a `ds finetune run` (holding metrics.jsonl)."),
    out: Optional[Path] = typer.Option(None, "--out", help="The PNG to write (default RUN_DIR/report.png)."),
) -> None:
    """A PNG of the run's loss terms, rewards and KL to the reference over the steps."""
    from deepseek.finetune.report import plot_finetune_report

    typer.echo(f"wrote {plot_finetune_report(run_dir, out)}")
