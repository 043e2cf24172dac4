"""The error for data problems that are the user's to fix."""

from deepseek.errors import UserFacingError


class DataError(UserFacingError, RuntimeError):
    """A data file or folder is missing, malformed or unusable; the message names it and says why."""
