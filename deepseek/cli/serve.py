"""``ds serve``: the inference server over a model repository (or one model directory)."""

from __future__ import annotations

import signal
import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)


def repository_for_model_dir(model_dir: Path, into: Path) -> Path:
    """A one-model repository ``into/<name>/1 -> model_dir``: the ``ds serve MODEL_DIR`` shortcut."""
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json)")
    name = "".join(c if c.isalnum() or c in "_.-" else "-" for c in model_dir.resolve().name) or "model"
    (into / name).mkdir(parents=True)
    (into / name / "1").symlink_to(model_dir.resolve(), target_is_directory=True)
    return into


def serve_command(
    model_dir: Optional[Path] = typer.Argument(None, help="One model directory to serve (shortcut for a repository)."),
    model_repository: Optional[Path] = typer.Option(None, help="A model repository: <repo>/<model>/<version>/."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (127.0.0.1 = this machine only)."),
    http_port: int = typer.Option(8080, help="HTTP port (KServe v2 REST)."),
    max_request_mb: float = typer.Option(64.0, help="Largest accepted request body, in MiB."),
) -> None:
    """Serve models over the KServe v2 HTTP protocol (tritonclient, KServe clients) until Ctrl-C; drains on exit."""
    try:
        import uvicorn
    except ImportError:
        raise FileNotFoundError("ds serve needs the serving extra: pip install 'deepseek-framework[serve]'") from None

    from deepseek.serve.manager import ModelManager
    from deepseek.serve.protocols.http_v2 import create_app
    from deepseek.serve.repository import ModelRepository

    if (model_dir is None) == (model_repository is None):
        raise typer.BadParameter("give either MODEL_DIR or --model-repository")
    with tempfile.TemporaryDirectory(prefix="ds-serve-") as tmp:
        root = model_repository if model_repository is not None else repository_for_model_dir(model_dir, Path(tmp))
        if not root.is_dir():
            raise FileNotFoundError(f"model repository {root} is not a directory")
        manager = ModelManager(ModelRepository(root))
        app = create_app(manager, max_request_bytes=int(max_request_mb * (1 << 20)))
        typer.echo(f"serving {root} on http://{host}:{http_port}/v2 (Ctrl-C drains and stops)")
        # uvicorn handles SIGINT/SIGTERM: it stops accepting, finishes in-flight requests, runs the app's
        # lifespan shutdown (which drains every batcher), then re-raises the signal; these handlers turn
        # that into a normal exit, since the stop was orderly.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: sys.exit(0))
        try:
            uvicorn.run(app, host=host, port=http_port, log_level="warning")
        finally:
            typer.echo("stopped; in-flight requests were drained")
