"""``ds.distill``: the design's distillation-loss name, re-exported from :mod:`deepseek.compat` (real code:
:mod:`deepseek.compress.distill`; see docs/design-names.md)."""

from deepseek.compat import TemperatureCrossEntropy

__all__ = ["TemperatureCrossEntropy"]
