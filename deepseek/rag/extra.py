"""The optional packages ``ds rag`` runs on, checked up front so that a missing one is one line, not a traceback.

    require_rag_extra()                      # all of them: the CLI commands that open or build an index
    require_rag_extra("sentence_transformers")  # only what this entry point imports

They install together as the ``rag`` extra of ``deepseek-framework``; the core package does not depend on them.
"""

from __future__ import annotations

import importlib

from deepseek.errors import UserFacingError

RAG_MODULES = ("faiss", "bm25s", "sentence_transformers")
"""Import names of the rag extra's packages that the index and the embedder need (faiss-cpu, bm25s,
sentence-transformers)."""
INSTALL_HINT = "pip install 'deepseek-framework[rag]'"


class MissingExtraError(UserFacingError):
    """A package of the rag extra cannot be imported."""


def require_rag_extra(*modules: str) -> None:
    """Raise :class:`MissingExtraError` naming every module of ``modules`` (default: all of ``RAG_MODULES``) that
    cannot be imported. A module already imported costs nothing."""
    missing = []
    for name in modules or RAG_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtraError(f"ds rag needs the rag extra: {INSTALL_HINT} (missing: {', '.join(missing)})")
