"""``ds lora``: LoRA adapter directories (``merge`` folds one into its base)."""

from __future__ import annotations

from pathlib import Path

import typer

lora_app = typer.Typer(no_args_is_help=True, help="LoRA adapters: merge into a model directory.")


def register(app: typer.Typer) -> None:
    app.add_typer(lora_app, name="lora")


@lora_app.command("merge")
def merge_command(
    base: Path = typer.Argument(..., help="The base model directory the adapter was trained on."),
    adapter: Path = typer.Argument(..., help="An adapter directory, PEFT's format or ours (e.g. run_dir/adapter "
                                             "of `ds finetune run`)."),
    out: Path = typer.Argument(..., help="Output model directory (the adapter folded into the weights)."),
) -> None:
    """Fold a LoRA adapter into its base: an ordinary model directory that computes as base + adapter."""
    from deepseek.finetune.run import merge_adapter

    merge_adapter(base, adapter, out)
    typer.echo(f"wrote {out}")
