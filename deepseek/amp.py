"""``ds.amp``: the design's mixed-precision names, re-exported from :mod:`deepseek.compat` (see docs/design-names.md)."""

from deepseek.compat import GradScaler, autocast

__all__ = ["GradScaler", "autocast"]
