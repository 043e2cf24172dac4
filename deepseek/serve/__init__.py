"""Serving: dynamic batching now; the model repository, protocols and `ds serve` build on it."""

from deepseek.serve.batching import (BatcherClosedError, BatcherStats, DeadlineExceededError, DynamicBatcher,
                                     QueueFullError)
