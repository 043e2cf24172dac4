"""Model backends for ``ds serve``: a loaded model version behind the batcher.

    backend = load_backend("digits", 1, repo.version_path("digits", 1), entry.config)
    outputs = backend.infer({"x": x})

``config.backend`` picks the class: ``deepseek`` (a model directory), ``torch`` (``model.pt2``,
``model.pt`` TorchScript, or a Python entry point), ``onnx`` (``model.onnx`` via onnxruntime), ``embedding``
(a sentence-transformers model, :mod:`deepseek.serve.backends.embedding_backend`) or ``retrieval`` (a knowledge
index, :mod:`deepseek.serve.backends.retrieval_backend`).
"""

from __future__ import annotations

from pathlib import Path

from deepseek.generate.threads import release_openmp_pool
from deepseek.serve.backends.base import Backend, BackendError
from deepseek.serve.config import ServingConfig


def load_backend(name: str, version: int, path: str | Path, config: ServingConfig) -> Backend:
    """Load one model version; :class:`BackendError` names the file and the reason on failure.

    The loading thread's idle OpenMP pool is released afterwards: the model runs on other threads (batch
    executors, the generation engine), whose pools would otherwise sleep between parallel regions
    (``deepseek.generate.threads``)."""
    try:
        return _construct(name, version, Path(path), config)
    finally:
        release_openmp_pool()


def _construct(name: str, version: int, path: Path, config: ServingConfig) -> Backend:
    if not path.is_dir():
        raise BackendError(f"{path} is not a directory (model {name!r} version {version})")
    if config.backend == "deepseek":
        from deepseek.serve.backends.deepseek_backend import DeepSeekBackend
        return DeepSeekBackend(name, version, path, config)
    if config.backend == "torch":
        from deepseek.serve.backends.torch_backend import TorchBackend
        return TorchBackend(name, version, path, config)
    if config.backend == "onnx":
        from deepseek.serve.backends.onnx_backend import OnnxBackend
        return OnnxBackend(name, version, path, config)
    if config.backend == "embedding":
        from deepseek.serve.backends.embedding_backend import EmbeddingBackend
        return EmbeddingBackend(name, version, path, config)
    if config.backend == "retrieval":
        from deepseek.serve.backends.retrieval_backend import RetrievalBackend
        return RetrievalBackend(name, version, path, config)
    raise BackendError(f"model {name!r}: unknown backend {config.backend!r} (deepseek, torch, onnx, embedding or "
                       f"retrieval)")


__all__ = ["Backend", "BackendError", "load_backend"]
