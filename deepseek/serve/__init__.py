"""Serving: dynamic batching, the model repository, KServe v2 over HTTP and gRPC, routing, metrics.

The package is callable: ``ds.serve(model_or_repo, port=8080)`` is :func:`deepseek.serve.server.serve` (a
module attribute ``deepseek.serve`` could not otherwise be both this package and that function)."""

import sys
import types

from deepseek.serve.batching import (BatcherClosedError, BatcherStats, DeadlineExceededError, DynamicBatcher,
                                     QueueFullError)
from deepseek.serve.config import (DATATYPE_TO_TORCH, DynamicBatchingConfig, ServingConfig, TensorSpec, VersionPolicy,
                                   load_serving_config, torch_dtype)
from deepseek.serve.repository import ModelEntry, ModelRepository, RepositoryChanges, RepositoryWatcher


class _CallableModule(types.ModuleType):
    def __call__(self, model_or_repo, port: int = 8080, **options):
        """Serve a model repository, a model directory or an in-memory model (see deepseek.serve.server.serve)."""
        from deepseek.serve.server import serve
        return serve(model_or_repo, port, **options)


sys.modules[__name__].__class__ = _CallableModule
