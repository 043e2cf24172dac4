"""Serving: dynamic batching, the model repository, KServe v2 over HTTP and gRPC, OpenAI's API, routing, metrics.

The server itself is :class:`deepseek.serve.server.Server` (``ds.Server``, and ``ds.serve(model_or_repo)`` to run
one); this package re-exports the pieces that work on their own.
"""

from deepseek.errors import QueueFullError
from deepseek.serve.batching import BatcherClosedError, BatcherStats, DeadlineExceededError, DynamicBatcher
from deepseek.serve.config import (DATATYPE_TO_TORCH, DynamicBatchingConfig, ServingConfig, TensorSpec, VersionPolicy,
                                   load_serving_config, torch_dtype)
from deepseek.serve.repository import ModelEntry, ModelRepository, RepositoryChanges, RepositoryWatcher

__all__ = ["BatcherClosedError", "BatcherStats", "DATATYPE_TO_TORCH", "DeadlineExceededError", "DynamicBatcher",
           "DynamicBatchingConfig", "ModelEntry", "ModelRepository", "QueueFullError", "RepositoryChanges",
           "RepositoryWatcher", "ServingConfig", "TensorSpec", "VersionPolicy", "load_serving_config", "torch_dtype"]
