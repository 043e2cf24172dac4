"""``ds convert``: move a model between our model directory and a Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

import typer


def convert(
    src: Path = typer.Argument(..., metavar="SRC", help="the folder to read"),
    out: Path = typer.Argument(..., metavar="OUT", help="the folder to write (replaced atomically if it exists)"),
    to_hf: bool = typer.Option(False, "--to-hf", help="SRC is a model directory; write a Hugging Face Mixtral folder"),
    from_hf: bool = typer.Option(False, "--from-hf", help="SRC is a Hugging Face Mixtral / Qwen2-MoE / Qwen3-MoE "
                                                           "folder; write a model directory"),
) -> None:
    """Convert a model directory to a Hugging Face folder (--to-hf), or back (--from-hf)."""
    if to_hf == from_hf:
        raise typer.BadParameter("pass exactly one of --to-hf or --from-hf", param_hint="--to-hf / --from-hf")
    # Imported here so that `ds --help` does not pay for torch.
    from deepseek.models.hf import convert_from_hf, convert_to_hf

    written = convert_to_hf(src, out) if to_hf else convert_from_hf(src, out)
    kind = "Hugging Face (Mixtral) folder" if to_hf else "model directory"
    typer.echo(f"wrote {kind} {written}")


def register(app: typer.Typer) -> None:
    """Add the ``convert`` command to the ``ds`` app."""
    app.command("convert")(convert)
