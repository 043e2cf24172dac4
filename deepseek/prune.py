"""``ds.prune``: the design's pruning name, re-exported from :mod:`deepseek.compat` (real code:
:mod:`deepseek.compress.prune`; see docs/design-names.md)."""

from deepseek.compat import l1_norm

__all__ = ["l1_norm"]
