"""Operating a model: where a training step or a generation goes (``ds profile``), what a serving log says
(``ds logs``), and how many devices a target needs (``ds plan``).

Layer: beside ``finetune``/``compress``/``rag`` — it may import ``train``, ``generate``, ``models``, ``data``, ``nn``,
``config``, ``hardware``, ``errors``, ``atomic``; never ``serve``, ``bench`` or ``cli``.
"""
