"""``ds.quantization``: the design's QAT names, re-exported from :mod:`deepseek.compat` (real code:
:mod:`deepseek.compress.qat`; see docs/design-names.md)."""

from deepseek.compat import convert, prepare

__all__ = ["convert", "prepare"]
