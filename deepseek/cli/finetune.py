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
