"""The terms of the BM25 index: one tokenizer for documents and queries, named so an index records which it used.

    bm25_tokens(["call get_user_id on the HTTPServer"])
    # [["call", "get_user_id", "get", "user", "id", "httpserver", "http", "server"]]

Code is written in identifiers and questions in words, so an identifier gives itself and its parts: split on
underscores (``b2a_base64`` -> b2a, base64), then on lower-to-upper case changes (``getUserId``), the end of an acronym
(``HTTPServer`` -> http, server) and digits (``base64`` -> base, 64). Then everything is lower-cased, terms of one character and English stop words
are dropped, and plurals are folded (``lines`` -> line, ``entries`` -> entry, ``classes`` -> class) so a question
about "the lines" finds ``line``. Plural folding was chosen on one question set (email, json, csv) and measured on
another (shutil, http, string): docs/rag.md, Evaluation.

``TOKENIZER`` names this behaviour; the index manifest records it and an index built with another one is refused
until ``ds rag index`` rebuilds its BM25 part.
"""

from __future__ import annotations

import functools
import re
from typing import Sequence

TOKENIZER = "code-words-v2"
"""v2: v1 (identifier parts, lower case, stop words) plus plural folding. An index without the name is v1."""
LEGACY_TOKENIZER = "code-words-v1"
DESCRIPTION = ("words and identifier parts (snake_case, camelCase, acronyms, digits) plus the whole identifier, "
               "lower-cased, plurals folded, English stop words dropped")

_WORD = re.compile(r"\w+")
_IDENTIFIER_PARTS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")


@functools.cache
def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


def fold_plural(term: str) -> str:
    """``entries`` -> entry, ``classes`` -> class, ``lines`` -> line; ``status``, ``class``, short words and
    numbers unchanged. Crude on purpose: the same rule runs on documents and queries, so it only has to agree
    with itself."""
    if len(term) > 4 and term.endswith("ies"):
        return term[:-3] + "y"
    if len(term) > 4 and term.endswith("sses"):
        return term[:-2]
    if len(term) > 3 and term.endswith("s") and not term.endswith(("ss", "us")):
        return term[:-1]
    return term


def word_terms(word: str) -> list[str]:
    """The terms of one ``\\w+`` word: the whole identifier (lower-cased, outer underscores stripped), each of its
    snake_case segments when there are several (``b2a_base64`` -> b2a, base64), then each segment's case and digit
    parts when it has more than one (base64 -> base, 64)."""
    whole = word.lower().strip("_")
    segments = [s for s in word.split("_") if s]
    terms = [whole]
    for segment in segments:
        lowered = segment.lower()
        # the part pattern knows ASCII case only: other scripts stay whole within a segment
        parts = [p.lower() for p in _IDENTIFIER_PARTS.findall(segment)] if segment.isascii() else [lowered]
        if len(segments) > 1:
            terms.append(lowered)
        if len(parts) > 1:
            terms.extend(parts)
    return terms


def bm25_tokens(texts: Sequence[str]) -> list[list[str]]:
    """BM25 terms of each text (the module docstring says which); the index and its queries both use this."""
    stopwords = _stopwords()
    return [[fold_plural(term) for word in _WORD.findall(text) for term in word_terms(word)
             if len(term) > 1 and term not in stopwords] for text in texts]
