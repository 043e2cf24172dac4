"""The library's shared exceptions, low in the layering: ``generate`` and ``serve`` both import this module.

    from deepseek.errors import QueueFullError     # a bounded queue refused a request (serve answers 429)
    from deepseek.errors import UserError          # what the CLI prints as one line instead of a traceback

``UserError`` names exception types defined above ``generate`` (train's CheckpointError), so it is built on
first use (PEP 562): importing ``QueueFullError`` from here pulls in nothing else.
"""


class QueueFullError(RuntimeError):
    """A bounded queue (the dynamic batcher's, the continuous batching engine's) is full: retry later.

    The server answers 429 with ``Retry-After`` (gRPC RESOURCE_EXHAUSTED, OpenAI ``rate_limit_error``)."""


def __getattr__(name: str):
    if name == "UserError":
        from deepseek.config import ConfigError
        from deepseek.data.errors import DataError
        from deepseek.models.directory import ModelDirectoryError
        from deepseek.train.checkpoint import CheckpointError

        return (ConfigError, DataError, CheckpointError, ModelDirectoryError, FileNotFoundError, ValueError)
    raise AttributeError(f"module 'deepseek.errors' has no attribute {name!r}")
