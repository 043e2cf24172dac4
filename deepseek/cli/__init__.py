"""The ``ds`` command."""
