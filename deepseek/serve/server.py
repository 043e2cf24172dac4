"""One serving process: the model manager, KServe v2 over HTTP and gRPC, and Prometheus metrics.

    ds.serve("models/", port=8080)                       # blocks until Ctrl-C / SIGTERM, then drains
    with ds.serve("my-model", port=0, block=False) as server:   # in a background thread
        print(server.url, server.grpc_target)

``model_or_repo`` is a model repository (``<repo>/<model>/<version>/``), one model directory (served as
model ``<dir name>`` version 1), or a deepseek ``MoETransformer`` in memory (saved to a temporary model
directory with its tokenizer, or the byte tokenizer); ``embeddings`` ({name: all-MiniLM-L6-v2 or a
sentence-transformers directory}) adds embedding models (``POST /v1/embeddings``) and ``rag_indexes`` ({name:
knowledge index directory}) retrieval models (``POST /v1/retrieve``) to the last two, or they are served alone
with ``model_or_repo`` None. :class:`Server` is what ``ds serve`` runs (the seeds'
``DeepseekServing`` is this class, under its old name in :mod:`deepseek.compat`).

Both front ends share one asyncio loop and one manager. On shutdown the gRPC server stops taking RPCs and
finishes the running ones, uvicorn does the same for HTTP, and then every model queue drains: no accepted
request is lost.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence


class ServeError(ValueError):
    """A server that cannot start (a port in use, a missing extra): the CLI prints the message as one line."""


DEFAULT_HTTP_PORT = 8080
DEFAULT_GRPC_PORT = 8081
# How long a stop (SIGTERM) lets in-flight HTTP requests and gRPC calls finish before they are cut: KServe's
# ModelServer grace period. A pod's terminationGracePeriodSeconds must exceed it (deploy/kubernetes/).
DEFAULT_DRAIN_TIMEOUT_S = 30.0


def repository_for_model_dir(model_dir: Path, into: Path, adapters: Optional[Mapping[str, str]] = None) -> Path:
    """A one-model repository ``into/<name>/1 -> model_dir``: the ``ds serve MODEL_DIR`` shortcut. ``adapters``
    ({name: LoRA adapter directory}, ``ds serve --adapter``) go into its config.yaml, as absolute paths."""
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json)")
    name = "".join(c if c.isalnum() or c in "_.-" else "-" for c in model_dir.resolve().name) or "model"
    (into / name).mkdir(parents=True)
    (into / name / "1").symlink_to(model_dir.resolve(), target_is_directory=True)
    if adapters:
        import yaml

        config = {"backend": "deepseek", "adapters": {n: str(Path(p).resolve()) for n, p in adapters.items()}}
        (into / name / "config.yaml").write_text(yaml.safe_dump(config))
    return into


def add_embedding_models(repo: Path, embeddings: Mapping[str, str]) -> None:
    """Folders ``repo/<name>/`` serving ``{name: source}`` with the embedding backend (``ds serve --embedding``):
    ``source`` is all-MiniLM-L6-v2 (or an alias: the packaged model) or a sentence-transformers directory."""
    import yaml

    from deepseek.rag.embed import DEFAULT_MODEL_ALIASES
    from deepseek.serve.repository import valid_model_name

    for name, source in embeddings.items():
        if not valid_model_name(name):
            raise ServeError(f"embedding model name {name!r} must match [A-Za-z0-9_.-]+")
        if (repo / name).exists():
            raise ServeError(f"embedding model name {name!r} is taken by another model")
        model = source if source in DEFAULT_MODEL_ALIASES else str(Path(source).resolve())
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.yaml").write_text(yaml.safe_dump({"backend": "embedding",
                                                                 "parameters": {"model": model}}))


def add_retrieval_models(repo: Path, indexes: Mapping[str, str]) -> None:
    """Folders ``repo/<name>/`` serving the knowledge index ``{name: index directory}`` with the retrieval backend
    (``ds serve --rag-index``; ``POST /v1/retrieve``), in hybrid mode with k = 5 by default."""
    import yaml

    from deepseek.serve.repository import valid_model_name

    for name, index in indexes.items():
        if not valid_model_name(name):
            raise ServeError(f"retrieval model name {name!r} must match [A-Za-z0-9_.-]+")
        if (repo / name).exists():
            raise ServeError(f"retrieval model name {name!r} is taken by another model")
        if not (Path(index) / "manifest.json").is_file():
            raise ServeError(f"--rag-index {name}={index}: {index} is not a knowledge index (no manifest.json; "
                             f"build one with ds rag index)")
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.yaml").write_text(yaml.safe_dump({"backend": "retrieval",
                                                                 "parameters": {"index": str(Path(index).resolve())}}))


def configure_threads(torch_threads: Optional[int] = None) -> int:
    """Give the models ``torch_threads`` intra-op threads (default: torch's own, one per core).

    Measured on 2 cores with 64 clients (docs/benchmarks.md): once the event loop's per-request work was
    lean, 2 threads beat 1 for a compute-bound transformer (368 vs 184 req/s) and for an MLP (2,465 vs
    2,138 req/s); with a heavy loop (before the lean infer path) 1 thread had won. Hence an option, not a rule."""
    import torch

    if torch_threads is not None:
        if torch_threads < 1:
            raise ServeError(f"torch_threads must be >= 1, got {torch_threads}")
        torch.set_num_threads(torch_threads)
    return torch.get_num_threads()


class Server:
    """A configured server; :meth:`run` blocks, :meth:`start` / :meth:`stop` run it in a thread."""

    def __init__(self, model_or_repo: Any, *, host: str = "127.0.0.1", port: int = DEFAULT_HTTP_PORT,
                 grpc_port: Optional[int] = None, api_key: Optional[str] = None, protect_inference: bool = False,
                 model_control: str = "none", load_models: Optional[Sequence[str]] = None,
                 poll_interval_s: float = 15.0, max_request_mb: float = 64.0, access_log: Optional[str] = None,
                 routing_header: str = "X-User-Id", model_name: Optional[str] = None, log_level: str = "warning",
                 torch_threads: Optional[int] = None, adapters: Optional[Mapping[str, str]] = None,
                 embeddings: Optional[Mapping[str, str]] = None, rag_indexes: Optional[Mapping[str, str]] = None,
                 drain_timeout_s: Optional[float] = DEFAULT_DRAIN_TIMEOUT_S):
        self.host, self.port, self.grpc_port = host, port, grpc_port
        if drain_timeout_s is not None and drain_timeout_s < 0:
            raise ServeError(f"the drain timeout must be >= 0 seconds (0 = no limit), got {drain_timeout_s:g}")
        self.drain_timeout_s = drain_timeout_s or None  # 0: wait for every in-flight request however long
        self.api_key = api_key if api_key is not None else os.environ.get("DS_API_KEY") or None
        self.protect_inference = protect_inference
        self.model_control, self.load_models, self.poll_interval_s = model_control, load_models, poll_interval_s
        self.max_request_bytes = int(max_request_mb * (1 << 20))
        self.access_log_target, self.routing_header, self.log_level = access_log, routing_header, log_level
        self.torch_threads = torch_threads
        if model_or_repo is None and not embeddings and not rag_indexes:
            raise ServeError("nothing to serve: give a model repository, a model directory, embedding models or "
                             "knowledge indexes")
        self._tmp = tempfile.mkdtemp(prefix="ds-serve-")
        try:
            self.repository_root = self._repository(model_or_repo, Path(self._tmp), model_name, adapters)
            generated = self.repository_root.resolve() == (Path(self._tmp) / "repo").resolve()
            if embeddings:
                if not generated:
                    raise ServeError("embedding models given with a model repository: add a model folder whose "
                                     "config.yaml says backend: embedding instead")
                add_embedding_models(self.repository_root, embeddings)
            if rag_indexes:
                if not generated:
                    raise ServeError("knowledge indexes given with a model repository: add a model folder whose "
                                     "config.yaml says backend: retrieval instead")
                add_retrieval_models(self.repository_root, rag_indexes)
        except BaseException:
            self._cleanup()  # a refused configuration leaves no temporary repository behind
            raise
        self._uvicorn = None
        self._thread: Optional[threading.Thread] = None
        self.manager = None

    @staticmethod
    def _repository(model_or_repo: Any, tmp: Path, model_name: Optional[str],
                    adapters: Optional[Mapping[str, str]] = None) -> Path:
        from deepseek.models import MoETransformer
        if model_or_repo is None:  # embedding and retrieval models only (ds serve --embedding / --rag-index)
            (tmp / "repo").mkdir()
            return tmp / "repo"
        if isinstance(model_or_repo, MoETransformer):
            from deepseek.data import byte_tokenizer
            from deepseek.models.directory import save
            tokenizer = getattr(model_or_repo, "tokenizer", None) or byte_tokenizer()
            model_dir = save(model_or_repo, tokenizer, tmp / "models" / (model_name or "model"))
            return repository_for_model_dir(Path(model_dir), tmp / "repo", adapters)
        path = Path(model_or_repo)
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is neither a model repository nor a model directory")
        if (path / "config.json").is_file():
            return repository_for_model_dir(path, tmp / "repo", adapters)
        if adapters:
            raise ServeError("adapters given with a model repository: list them in the model's config.yaml "
                             "(adapters: {name: dir}) instead")
        return path

    # -- building ------------------------------------------------------------------------------------------

    def build_app(self):
        """The ASGI app (FastAPI) with the gRPC server hooked into its lifespan."""
        from deepseek.serve.manager import ModelManager
        from deepseek.serve.metrics import ServingMetrics
        from deepseek.serve.protocols.common import AccessLog
        from deepseek.serve.protocols.http_v2 import create_app
        from deepseek.serve.repository import ModelRepository

        self.manager = ModelManager(ModelRepository(self.repository_root), control_mode=self.model_control,
                                    startup_models=self.load_models)
        metrics = ServingMetrics(self.manager)
        access_log = AccessLog(self.access_log_target) if self.access_log_target else None
        grpc_state: dict[str, Any] = {}

        async def start_grpc() -> None:
            if self.grpc_port is None:
                return
            from deepseek.serve.protocols.grpc_v2 import create_grpc_server
            server, bound = create_grpc_server(self.manager, host=self.host, port=self.grpc_port,
                                               api_key=self.api_key, protect_inference=self.protect_inference,
                                               max_message_bytes=self.max_request_bytes, access_log=access_log,
                                               routing_header=self.routing_header)
            await server.start()
            grpc_state["server"], self.grpc_port = server, bound

        async def stop_grpc() -> None:
            server = grpc_state.pop("server", None)
            if server is not None:
                # running RPCs finish; new ones are refused (grace None would abort them: "no limit" is a day)
                await server.stop(grace=self.drain_timeout_s or 86400.0)
            if access_log is not None:
                access_log.close()

        return create_app(self.manager, max_request_bytes=self.max_request_bytes, api_key=self.api_key,
                          protect_inference=self.protect_inference, metrics=metrics, access_log=access_log,
                          routing_header=self.routing_header, poll_interval_s=self.poll_interval_s,
                          on_startup=start_grpc, on_shutdown=stop_grpc)

    def _uvicorn_server(self):
        try:
            import uvicorn
        except ImportError:
            raise ServeError("serving needs the serve extra: pip install 'deepseek-framework[serve]'") from None
        # No proxy-header rewriting (nothing sits in front by default) and no uvicorn access log (ours is
        # structured): both cost per request on the one event-loop core.
        config = uvicorn.Config(self.build_app(), host=self.host, port=self.port, log_level=self.log_level,
                                lifespan="on", timeout_graceful_shutdown=self.drain_timeout_s, proxy_headers=False,
                                access_log=False)
        return uvicorn.Server(config)

    # -- running -------------------------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """True once the server has listened (it stays true after a stop)."""
        return self._uvicorn is not None and bool(self._uvicorn.started)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def grpc_target(self) -> Optional[str]:
        return None if self.grpc_port is None else f"{self.host}:{self.grpc_port}"

    def check_ports(self) -> None:
        """A port already taken is a one-line error before anything loads, not a traceback after."""
        for what, port in (("HTTP", self.port), ("gRPC", self.grpc_port)):
            if not port:
                continue
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
                try:
                    probe.bind((self.host, port))
                except OSError as exc:
                    raise ServeError(f"cannot serve {what} on {self.host}:{port}: {exc.strerror or exc} "
                                    f"(choose another port with --{what.lower()}-port)") from None

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM (uvicorn's handlers), then drain every accepted request and return."""
        self.check_ports()
        self._uvicorn = self._uvicorn_server()
        configure_threads(self.torch_threads)
        try:
            self._uvicorn.run()
        finally:
            self._cleanup()
        if not self._uvicorn.started:
            raise ServeError(f"the server could not start on {self.host}:{self.port} (see the log above)")

    def start(self, timeout_s: float = 120.0) -> "Server":
        """Run in a background thread; returns once the models are loaded and both ports listen."""
        self.check_ports()
        self._uvicorn = self._uvicorn_server()
        configure_threads(self.torch_threads)
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run_in_thread, args=(ready,), name="ds-serve", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s) or not self._uvicorn.started:
            self.stop()
            raise ServeError(f"the server did not start on {self.host}:{self.port}")
        sockets = self._uvicorn.servers[0].sockets if self._uvicorn.servers else []
        if sockets:
            self.port = sockets[0].getsockname()[1]  # port 0: the one the OS picked
        return self

    def _run_in_thread(self, ready: threading.Event) -> None:
        async def main() -> None:
            task = asyncio.ensure_future(self._uvicorn.serve())
            while not self._uvicorn.started and not task.done():
                await asyncio.sleep(0.01)
            ready.set()
            await task

        try:
            asyncio.run(main())
        finally:
            ready.set()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop a server started with :meth:`start`: stop accepting, drain, join the thread."""
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self._cleanup()

    def _cleanup(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "Server":
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(model_or_repo: Any, port: int = DEFAULT_HTTP_PORT, *, block: bool = True, **options: Any) -> Server:
    """Serve a model repository, a model directory or an in-memory model (see :class:`Server`).

    ``block=True`` runs until Ctrl-C / SIGTERM and drains; ``block=False`` returns the started server
    (``.url``, ``.grpc_target``, ``.stop()``; also a context manager)."""
    server = Server(model_or_repo, port=port, **options)
    if block:
        server.run()
        return server
    return server.start()
