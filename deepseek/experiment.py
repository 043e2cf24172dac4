"""``deepseek.experiment``: the design's A/B-test name, re-exported from :mod:`deepseek.compat`.

``ABTest(control_ratio=0.7, metrics=["click"])`` is :class:`deepseek.serve.routing.ABTest`, the routing policy
``ds serve`` runs (``describe()`` is its ``routing:`` section in a model's config.yaml); see docs/design-names.md.
"""

from deepseek.compat import ABTest

__all__ = ["ABTest"]
