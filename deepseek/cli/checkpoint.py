"""``ds checkpoint export``: the model of a (sharded) training checkpoint as an ordinary model directory."""

from __future__ import annotations

from pathlib import Path

import typer

checkpoint_app = typer.Typer(no_args_is_help=True, help="Training checkpoints: export a sharded one as a model directory.")


@checkpoint_app.command("export")
def export_command(
    checkpoint: Path = typer.Argument(..., metavar="CKPT", help="a checkpoint folder, e.g. runs/r/checkpoints/step-00000500"),
    out: Path = typer.Argument(..., metavar="OUT", help="the model directory to write"),
) -> None:
    """Assemble a sharded (torch.distributed.checkpoint) checkpoint's model into one model directory; no
    process group needed, any number of ranks may have written it. `ds.load(OUT)` opens the result."""
    from deepseek.parallel.checkpoint import export_model_dir

    path = export_model_dir(checkpoint, out)
    typer.echo(f"model: {path}")


def register(app: typer.Typer) -> None:
    app.add_typer(checkpoint_app, name="checkpoint")
