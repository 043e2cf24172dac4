"""Serving: dynamic batching now; the model repository, protocols and `ds serve` build on it."""

from deepseek.serve.batching import (BatcherClosedError, BatcherStats, DeadlineExceededError, DynamicBatcher,
                                     QueueFullError)
from deepseek.serve.config import (DATATYPE_TO_TORCH, DynamicBatchingConfig, ServingConfig, TensorSpec, VersionPolicy,
                                   load_serving_config, torch_dtype)
from deepseek.serve.repository import ModelEntry, ModelRepository, RepositoryChanges, RepositoryWatcher
