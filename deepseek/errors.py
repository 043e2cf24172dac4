"""Errors that are the user's to fix: the CLI prints them as one line instead of a traceback."""

from deepseek.config import ConfigError
from deepseek.data.errors import DataError
from deepseek.models.directory import ModelDirectoryError
from deepseek.checkpoint_folder import CheckpointError

UserError = (ConfigError, DataError, CheckpointError, ModelDirectoryError, FileNotFoundError, ValueError)
