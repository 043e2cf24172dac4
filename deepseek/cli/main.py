"""``ds``: the command line. One module per command group; this file only assembles them.

Exit codes: 0 ok, 2 usage error (bad option, bad config key or value), 1 runtime error. Errors print one
line; ``ds --debug …`` shows the traceback instead.
"""

from __future__ import annotations

import sys

import typer

from deepseek.cli import (bench, checkpoint, compress, convert, data, evaluate, export, finetune, generate, init,
                          logs, lora, plan, profile, quickstart, rag, serve, train)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="DeepSeek Framework: build, train, compress, export and serve MoE language models.")

_debug = False


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors.")) -> None:
    global _debug
    _debug = debug


quickstart.register(app)
init.register(app)
data.register(app)
train.register(app)
evaluate.register(app)
generate.register(app)
serve.register(app)
convert.register(app)
compress.register(app)
export.register(app)
checkpoint.register(app)
bench.register(app)
finetune.register(app)
lora.register(app)
rag.register(app)
logs.register(app)
plan.register(app)
profile.register(app)


def main() -> None:
    """Entry point of the ``ds`` console script."""
    from deepseek.config import ConfigError
    from deepseek.errors import UserError

    try:
        app()
    except KeyboardInterrupt:
        typer.secho("interrupted", fg=typer.colors.RED, err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence: one line, not a traceback
        if _debug:
            raise
        expected = isinstance(exc, UserError)
        message = str(exc) if expected else f"{type(exc).__name__}: {exc} (run `ds --debug …` for the traceback)"
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
        sys.exit(2 if isinstance(exc, ConfigError) else 1)


if __name__ == "__main__":
    main()
