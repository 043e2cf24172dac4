"""``ds serve``: the inference server over a model repository (or one model directory)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer

from deepseek.serve.server import DEFAULT_DRAIN_TIMEOUT_S, DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)


def serve_command(
    model_dir: Optional[Path] = typer.Argument(None, help="One model directory to serve (shortcut for a repository)."),
    model_repository: Optional[Path] = typer.Option(None, help="A model repository: <repo>/<model>/<version>/."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (127.0.0.1 = this machine only)."),
    http_port: int = typer.Option(DEFAULT_HTTP_PORT, help="HTTP port (KServe v2 REST, /metrics)."),
    grpc_port: int = typer.Option(DEFAULT_GRPC_PORT, help="gRPC port (KServe v2 / Triton GRPCInferenceService)."),
    no_grpc: bool = typer.Option(False, "--no-grpc", help="Serve HTTP only."),
    api_key: Optional[str] = typer.Option(None, envvar="DS_API_KEY", show_envvar=True,
                                          help="Key for the management API (load/unload, routing, experiments); "
                                               "without one those routes are disabled."),
    protect_inference: bool = typer.Option(False, help="Require the API key for inference too."),
    model_control: str = typer.Option("none", help="none: load all at start, no changes | poll: follow the "
                                                   "repository | explicit: load/unload through the API."),
    load_model: Optional[List[str]] = typer.Option(None, help="With --model-control explicit: models to load at "
                                                              "start (repeatable; '*' = all; default: all)."),
    repository_poll_secs: float = typer.Option(15.0, help="With --model-control poll: seconds between scans."),
    drain_timeout_secs: float = typer.Option(DEFAULT_DRAIN_TIMEOUT_S, help="On SIGTERM / Ctrl-C: seconds in-flight "
                                             "requests get to finish before they are cut (0 = no limit). Keep a "
                                             "pod's terminationGracePeriodSeconds above it."),
    max_request_mb: float = typer.Option(64.0, help="Largest accepted request body, in MiB."),
    access_log: Optional[str] = typer.Option(None, help="Write a JSON-lines access log to this file ('-' = stderr)."),
    routing_header: str = typer.Option("X-User-Id", help="Request header whose value keeps a user on one A/B "
                                                         "variant."),
    torch_threads: Optional[int] = typer.Option(None, help="Intra-op threads for the models (default: torch's, "
                                                           "one per core)."),
    adapter: Optional[List[str]] = typer.Option(None, help="NAME=DIR: serve the LoRA adapter directory DIR with "
                                                           "MODEL_DIR as model '<model>:NAME' (repeatable)."),
    embedding: Optional[List[str]] = typer.Option(None, help="NAME=DIR or NAME=minilm (or just minilm): serve a "
                                                             "sentence-transformers model (DIR) or the packaged "
                                                             "all-MiniLM-L6-v2 as embedding model NAME for "
                                                             "POST /v1/embeddings (repeatable)."),
    rag_index: Optional[List[str]] = typer.Option(None, "--rag-index", help="NAME=INDEX: serve the knowledge index "
                                                                            "INDEX (ds rag index) as retrieval model "
                                                                            "NAME for POST /v1/retrieve "
                                                                            "(repeatable)."),
) -> None:
    """Serve models over KServe v2 HTTP and gRPC (tritonclient, KServe clients) until Ctrl-C; drains on exit."""
    from deepseek.config import ConfigError
    from deepseek.serve.manager import CONTROL_MODES
    from deepseek.serve.server import Server

    embeddings = parse_embeddings(embedding or [])
    rag_indexes = parse_rag_indexes(rag_index or [])
    if model_dir is not None and model_repository is not None:
        raise typer.BadParameter("give either MODEL_DIR or --model-repository")
    if model_dir is None and model_repository is None and not embeddings and not rag_indexes:
        raise typer.BadParameter("give MODEL_DIR, --model-repository, --embedding or --rag-index")
    if embeddings and model_repository is not None:
        raise ConfigError("--embedding works with MODEL_DIR or alone; in a model repository add a model folder "
                          "whose config.yaml says backend: embedding")
    if rag_indexes and model_repository is not None:
        raise ConfigError("--rag-index works with MODEL_DIR or alone; in a model repository add a model folder "
                          "whose config.yaml says backend: retrieval")
    if model_control not in CONTROL_MODES:
        raise ConfigError(f"--model-control {model_control!r} is not one of {', '.join(CONTROL_MODES)}")
    root = model_repository if model_repository is not None else model_dir
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    adapters = parse_adapters(adapter or [])
    if adapters and model_dir is None:
        raise ConfigError("--adapter needs MODEL_DIR; with --model-repository list adapters in the model's "
                          "config.yaml (adapters: {name: dir})")
    server = Server(root, host=host, port=http_port, grpc_port=None if no_grpc else grpc_port, api_key=api_key,
                    protect_inference=protect_inference, model_control=model_control, load_models=load_model,
                    poll_interval_s=repository_poll_secs, max_request_mb=max_request_mb, access_log=access_log,
                    routing_header=routing_header, torch_threads=torch_threads, adapters=adapters,
                    embeddings=embeddings, rag_indexes=rag_indexes, drain_timeout_s=drain_timeout_secs)
    server.check_ports()
    grpc = "" if no_grpc else f", gRPC on {host}:{grpc_port}"
    what = ", ".join([str(root)] * (root is not None) + [f"embedding model {n}" for n in embeddings]
                     + [f"retrieval model {n}" for n in rag_indexes])
    typer.echo(f"serving {what} on http://{host}:{http_port}/v2{grpc}; metrics at /metrics "
               f"(Ctrl-C drains and stops)")
    if not server.api_key:
        typer.echo("management API disabled (no --api-key)")
    # uvicorn handles SIGINT/SIGTERM: it stops accepting, finishes in-flight requests, runs the app's lifespan
    # shutdown (gRPC stops with a grace period, then every queue drains), then re-raises the signal; these
    # handlers turn that into a normal exit, since the stop was orderly.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sys.exit(0))
    try:
        server.run()
    finally:  # also on the SystemExit of the signal handlers above
        if server.started:
            typer.echo("stopped; in-flight requests were drained")


def parse_adapters(options: List[str]) -> dict[str, str]:
    """``--adapter NAME=DIR`` options -> {NAME: DIR}; a ConfigError (one line) for a malformed or repeated one."""
    from deepseek.config import ConfigError
    from deepseek.serve.config import ADAPTER_NAME

    adapters: dict[str, str] = {}
    for option in options:
        name, equals, directory = option.partition("=")
        if not equals or not ADAPTER_NAME.fullmatch(name) or not directory:
            raise ConfigError(f"--adapter {option!r}: expected NAME=DIR, NAME of letters, digits, '.', '_' or '-'")
        if name in adapters:
            raise ConfigError(f"--adapter {name!r} is given twice")
        if not Path(directory).is_dir():
            raise ConfigError(f"--adapter {name}={directory}: {directory} is not a directory")
        adapters[name] = directory
    return adapters


def parse_embeddings(options: List[str]) -> dict[str, str]:
    """``--embedding NAME=SOURCE`` options (SOURCE a sentence-transformers directory or minilm / all-MiniLM-L6-v2,
    the packaged model; a bare alias names itself) -> {NAME: SOURCE}; a ConfigError (one line) when malformed."""
    from deepseek.config import ConfigError
    from deepseek.rag.embed import DEFAULT_MODEL_ALIASES
    from deepseek.serve.repository import valid_model_name

    embeddings: dict[str, str] = {}
    for option in options:
        name, equals, source = option.partition("=")
        if not equals and option in DEFAULT_MODEL_ALIASES:
            name, source = option.rpartition("/")[2], option
        if not valid_model_name(name) or not source:
            raise ConfigError(f"--embedding {option!r}: expected NAME=DIR or NAME=minilm, NAME of letters, digits, "
                              f"'.', '_' or '-'")
        if name in embeddings:
            raise ConfigError(f"--embedding {name!r} is given twice")
        if source not in DEFAULT_MODEL_ALIASES and not Path(source).is_dir():
            raise ConfigError(f"--embedding {name}={source}: {source} is not a directory (or use minilm, the "
                              f"packaged all-MiniLM-L6-v2)")
        embeddings[name] = source
    return embeddings


def parse_rag_indexes(options: List[str]) -> dict[str, str]:
    """``--rag-index NAME=INDEX`` options -> {NAME: INDEX}; a ConfigError (one line) when malformed, repeated, or
    when INDEX is not a knowledge index directory."""
    from deepseek.config import ConfigError
    from deepseek.serve.repository import valid_model_name

    indexes: dict[str, str] = {}
    for option in options:
        name, equals, index = option.partition("=")
        if not equals or not valid_model_name(name) or not index:
            raise ConfigError(f"--rag-index {option!r}: expected NAME=INDEX, NAME of letters, digits, '.', '_' or "
                              f"'-'")
        if name in indexes:
            raise ConfigError(f"--rag-index {name!r} is given twice")
        if not (Path(index) / "manifest.json").is_file():
            raise ConfigError(f"--rag-index {name}={index}: {index} is not a knowledge index (no manifest.json; "
                              f"build one with ds rag index)")
        indexes[name] = index
    return indexes
