"""Token-aware chunking: a section's text cut into pieces the embedding model reads whole, with a token overlap.

Sizes are counted by the embedding model's own tokenizer (any object with ``tokenize_offsets(text)`` and
``count_tokens(texts)``, e.g. :class:`deepseek.rag.embed.Embedder`), so no chunk is silently truncated by the model:
``max_tokens`` includes the model's special tokens ([CLS]/[SEP] for BERT: 256 → 254 tokens of text).

A chunk never crosses its section (heading, definition, page, row). Inside a section consecutive chunks share
``overlap_tokens`` tokens; cuts fall between words (never inside a word piece run, so the chunk re-tokenizes to the
same pieces), preferring a line end when one lies in the last half of the window. A single word longer than the window
is cut inside it, and that chunk is re-counted and shortened until it fits.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from dataclasses import dataclass
from typing import Callable, Protocol

from deepseek.config import ConfigError
from deepseek.rag.ingest import Section


class Tokenizer(Protocol):
    def tokenize_offsets(self, text: str) -> list[tuple[int, int]]: ...  # char spans of the pieces, no specials
    def count_tokens(self, texts: list[str]) -> list[int]: ...  # pieces including the specials, no truncation


@dataclass
class TextChunk:
    """A piece of one section: ``text`` is ``section.text[start:end]``; ``span`` is in the section's span unit."""

    text: str
    start: int
    end: int
    span: tuple[int, int]
    hash: str


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_sizes(max_tokens: int, overlap_tokens: int, specials: int) -> int:
    """The text tokens a chunk may hold (``max_tokens - specials``); raises ConfigError for sizes that cannot work."""
    window = max_tokens - specials
    if window < 2:
        raise ConfigError(f"max_tokens {max_tokens} leaves no room for text after the model's {specials} special "
                          "tokens")
    if not 0 <= overlap_tokens <= window // 2:  # more would make most of every chunk a repeat of the last one
        raise ConfigError(f"overlap_tokens must be in [0, {window // 2}] (at most half of a chunk's {window} text "
                          f"tokens) for max_tokens {max_tokens}, got {overlap_tokens}")
    return window


def token_windows(text: str, offsets: list[tuple[int, int]], window: int, overlap: int,
                  fits: Callable[[int, int], bool] | None = None) -> list[tuple[int, int]]:
    """``[first, last)`` token ranges covering all of ``offsets``, each at most ``window`` long, consecutive ones
    sharing ``overlap`` tokens (up to ``2 * overlap`` where that much is needed to start at a word). A range that
    starts or ends inside a word is shortened until ``fits(first, last)`` says its text, tokenized alone, still fits
    (giving up overlap before progress)."""
    n = len(offsets)
    ranges: list[tuple[int, int]] = []
    first = 0
    while first < n:
        done = ranges[-1][1] if ranges else 0  # this range must reach past the last one: progress
        last = min(n, first + window)
        if last < n:
            shortest = max(first + max(overlap + 1, window // 2), done + 1)  # and no tiny chunks
            cut = next((i for i in range(last, shortest - 1, -1)
                        if _word_start(text, offsets, i) and "\n" in text[offsets[i - 1][1]:offsets[i][0]]), None)
            if cut is None:
                cut = next((i for i in range(last, max(first + overlap, done), -1)
                            if _word_start(text, offsets, i)), last)
            last = cut
        if fits is not None and not (_word_start(text, offsets, first) and _word_start(text, offsets, last)):
            while not fits(first, last):
                if last - 1 > max(first, done):
                    last -= 1
                elif first + 1 < min(last, done + 1):  # give up overlap before progress
                    first += 1
                else:
                    break  # a single piece that does not fit alone: kept (the model truncates it)
        ranges.append((first, last))
        if last == n:
            break
        following = last - overlap
        start = next((i for i in range(following, max(first, following - overlap, last - window), -1)
                      if _word_start(text, offsets, i)), following)
        first = max(start, first + 1)
    return ranges


def _word_start(text: str, offsets: list[tuple[int, int]], i: int) -> bool:
    """May a chunk start at token ``i`` (and the one before end at ``i``) without splitting a word's pieces?"""
    if i <= 0 or i >= len(offsets):
        return True
    joined = offsets[i][0] <= offsets[i - 1][1]
    return not (joined and text[offsets[i][0]].isalnum() and text[offsets[i][0] - 1].isalnum())


def chunk_section(section: Section, tokenizer: Tokenizer, *, max_tokens: int, overlap_tokens: int,
                  specials: int | None = None) -> list[TextChunk]:
    """Cut one section into chunks of at most ``max_tokens`` model tokens (specials included) with
    ``overlap_tokens`` shared between neighbours. ``specials`` defaults to the tokenizer's count for ``""``."""
    if specials is None:
        specials = tokenizer.count_tokens([""])[0]
    window = check_sizes(max_tokens, overlap_tokens, specials)
    text = section.text
    offsets = tokenizer.tokenize_offsets(text)
    newlines = [m.start() for m in re.finditer("\n", text)] if section.first_line is not None else []

    def fits(first: int, last: int) -> bool:
        piece = text[_line_indent_start(text, offsets[first][0]):offsets[last - 1][1]]
        return tokenizer.count_tokens([piece])[0] <= max_tokens

    chunks = []
    for first, last in token_windows(text, offsets, window, overlap_tokens, fits):
        start, end = _line_indent_start(text, offsets[first][0]), offsets[last - 1][1]
        piece = text[start:end]
        if section.first_line is not None:
            span = (section.first_line + bisect.bisect_left(newlines, start),
                    section.first_line + bisect.bisect_left(newlines, end - 1))
        else:
            span = section.span
        chunks.append(TextChunk(piece, start, end, span, text_hash(piece)))
    return chunks


def _line_indent_start(text: str, start: int) -> int:
    """Move a chunk's start back over the indentation before it on its line (code keeps its shape; no tokens added)."""
    begin = start
    while begin > 0 and text[begin - 1] in " \t":
        begin -= 1
    return begin if begin == 0 or text[begin - 1] == "\n" else start
