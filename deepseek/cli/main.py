"""``ds``: the command line. One module per command group; this file only assembles them."""

from __future__ import annotations

import sys

import typer

from deepseek.cli import convert, generate, init

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="DeepSeek Framework: build, train, compress, export and serve MoE language models.")
init.register(app)
generate.register(app)
convert.register(app)


def main() -> None:
    """Entry point of the ``ds`` console script. Expected errors print one line, not a traceback."""
    from deepseek.errors import UserError

    try:
        app()
    except UserError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
