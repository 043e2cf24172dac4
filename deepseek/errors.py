"""The library's shared exceptions: a leaf module (it imports nothing), so that every layer can raise them.

    from deepseek.errors import QueueFullError     # a bounded queue refused a request (serve answers 429)
    from deepseek.errors import UserError          # what the CLI prints as one line instead of a traceback
"""


class UserFacingError(Exception):
    """Base of the errors that are the user's to fix and whose message says which file or value and why.

    DataError, ModelDirectoryError and CheckpointError derive from it (and from RuntimeError, as before)."""


# What `ds` and `python -m deepseek.train` print as one line instead of a traceback: the errors above, a bad
# value (ConfigError is a ValueError) or a path that is not there.
UserError = (UserFacingError, FileNotFoundError, ValueError)


class QueueFullError(RuntimeError):
    """A bounded queue (the dynamic batcher's, the continuous batching engine's) is full: retry later.

    The server answers 429 with ``Retry-After`` (gRPC RESOURCE_EXHAUSTED, OpenAI ``rate_limit_error``)."""
