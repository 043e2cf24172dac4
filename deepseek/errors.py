"""Errors that are the user's to fix: the CLI prints them as one line instead of a traceback."""

from deepseek.config import ConfigError
from deepseek.models.directory import ModelDirectoryError

UserError = (ConfigError, ModelDirectoryError, FileNotFoundError, ValueError)
