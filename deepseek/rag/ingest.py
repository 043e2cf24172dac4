"""Reading documents for the knowledge base: sources → files → sections with their structure and spans.

A source is a file, a folder (recursive; hidden entries and ``__pycache__`` are left out) or a glob pattern
(``"docs/**/*.md"``, ``**`` recursive). Each file becomes :class:`Section` s by its type:

- ``.txt``: one section, the whole file;
- ``.md`` / ``.rst``: one section per heading (the heading is the title; text before the first heading is a section
  titled ``""``); headings inside fenced code blocks do not count;
- ``.py``: the module part (docstring, imports, anything before the first definition) first, then one section per
  top-level ``def`` / ``class`` with its decorators, comments just above it, and its docstring; top-level code between
  definitions is a section of its own (located with ``ast``, so spans are exact lines);
- ``.html`` / ``.htm``: the main text (``<main>`` or ``<article>`` when there is one, else ``<body>``; script, style,
  nav, header, footer, aside and form dropped), one section per heading, spans in source lines;
- ``.pdf``: one section per page with text (pypdf);
- ``.jsonl``: one section per row with a string ``text`` field; the other fields are its metadata (a string
  ``title`` field is also its title).

Files that cannot be read — binary, not UTF-8, an unknown type, a corrupt PDF, a bad JSON Lines row — are reported
as :class:`Skipped` with the reason, never raised: one bad file does not stop an indexing run.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from deepseek.data.sources import source_files
from deepseek.errors import UserFacingError

FILE_TYPES = {".txt": "txt", ".text": "txt", ".md": "md", ".markdown": "md", ".rst": "rst", ".py": "py",
              ".html": "html", ".htm": "html", ".pdf": "pdf", ".jsonl": "jsonl"}
"""Suffix → the ``type`` recorded for each chunk."""

_SKIPPED_FOLDERS = frozenset({"__pycache__", "node_modules"})
_HTML_DROPPED = ["script", "style", "nav", "header", "footer", "aside", "form", "noscript", "template", "svg"]
_HTML_HEADINGS = ["h1", "h2", "h3", "h4", "h5", "h6"]
_HTML_BLOCKS = {"p", "div", "li", "dt", "dd", "pre", "td", "th", "tr", "blockquote", "section", "article", "main",
                "table", "ul", "ol", "dl", "figcaption", "body", *_HTML_HEADINGS}


class SourceError(UserFacingError):
    """A source names no file, folder or glob match."""


@dataclass
class Section:
    """A structural unit of one file that chunks never cross.

    ``span`` is where it lies in the file, in ``span_unit`` s (1-based, inclusive): lines, a PDF page or a JSON Lines
    row. ``first_line`` is set when ``text``'s lines are the file's lines from that one on, so a chunk's own line span
    can be computed; otherwise (HTML, PDF, JSON Lines) a chunk's span is its section's."""

    source: str
    type: str
    title: str
    text: str
    span: tuple[int, int]
    span_unit: str
    first_line: int | None = None
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Skipped:
    """A file (``path``, or ``path:line`` for a JSON Lines row) left out of the index, and why."""

    path: str
    reason: str


def expand_sources(sources: Sequence[str | os.PathLike]) -> list[str]:
    """The files ``sources`` name, resolved to absolute paths, deduplicated, in a deterministic order.

    Every file under a folder is listed, whatever its type (an unknown type is reported when it is read, not
    dropped silently). A path that does not exist and matches no glob raises :class:`SourceError`; a glob or a folder
    that matches nothing contributes nothing."""
    files: dict[str, None] = {}
    for source in sources:
        source = os.fspath(source)
        found = source_files(source, skip_folders=_SKIPPED_FOLDERS)  # every type: an unknown one is reported later
        if found is None:
            raise SourceError(f"no such file, folder or glob match: {source}")
        files.update((str(Path(p).resolve()), None) for p in found)
    return list(files)


def file_hash(path: str) -> str:
    """sha256 of the file's bytes (what incremental indexing compares)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_sections(path: str) -> tuple[list[Section], list[Skipped]]:
    """The sections of one file and what was skipped (the whole file, or bad JSON Lines rows), never raising for a
    file's content."""
    kind = FILE_TYPES.get(Path(path).suffix.lower())
    if kind is None:
        suffix = Path(path).suffix or "(no suffix)"
        return [], [Skipped(path, f"unsupported file type {suffix}")]
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return [], [Skipped(path, f"unreadable: {exc.strerror or exc}")]
    if kind == "pdf":
        return _pdf_sections(path, data)
    if b"\0" in data[:8192]:
        return [], [Skipped(path, "binary file (NUL bytes)")]
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return [], [Skipped(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})")]
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if kind == "jsonl":
        return _jsonl_sections(path, text)
    reader = {"txt": _txt_sections, "md": _markdown_sections, "rst": _rst_sections, "py": _python_sections,
              "html": _html_sections}[kind]
    return reader(path, text), []


# --- plain text, Markdown, reStructuredText: sections are runs of whole lines -------------------------------------

def _line_sections(path: str, kind: str, lines: list[str], starts: list[tuple[int, str]]) -> list[Section]:
    """Sections from 0-based ``(first line, title)`` starts over ``lines``; empty ones are dropped."""
    if not starts or starts[0][0] != 0:
        starts = [(0, ""), *starts]
    sections = []
    for (begin, title), (end, _) in zip(starts, [*starts[1:], (len(lines), "")]):
        while end > begin and not lines[end - 1].strip():  # trailing blank lines belong to no one
            end -= 1
        text = "\n".join(lines[begin:end])
        if text.strip():
            sections.append(Section(path, kind, title, text, (begin + 1, end), "lines", first_line=begin + 1))
    return sections


def _txt_sections(path: str, text: str) -> list[Section]:
    return _line_sections(path, "txt", text.split("\n"), [])


_FENCE = re.compile(r"^\s{0,3}(```|~~~)")
_ATX = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_SETEXT = re.compile(r"^\s{0,3}(=+|-+)\s*$")


def _markdown_sections(path: str, text: str) -> list[Section]:
    lines = text.split("\n")
    starts, fence = [], None
    for i, line in enumerate(lines):
        opened = _FENCE.match(line)
        if fence is not None:
            if opened and opened.group(1) == fence:
                fence = None
            continue
        if opened:
            fence = opened.group(1)
        elif (heading := _ATX.match(line)) and heading.group(2):
            starts.append((i, heading.group(2)))
        elif (i > 0 and _SETEXT.match(line) and lines[i - 1].strip() and not _ATX.match(lines[i - 1])
              and (i == 1 or not lines[i - 2].strip())):  # a one-line paragraph underlined: a setext heading
            starts.append((i - 1, lines[i - 1].strip()))
    return _line_sections(path, "md", lines, starts)


_RST_ADORNMENT = re.compile(r"^([=\-~^\"'`#*+:.!$%&,;<>?@_|/\\])\1{2,}\s*$")


def _rst_sections(path: str, text: str) -> list[Section]:
    """Titles are a text line underlined (and optionally overlined) by a run of one punctuation character at least
    as long as the title."""
    lines = text.split("\n")
    starts = []
    i = 1
    while i < len(lines):
        title = lines[i - 1].rstrip()
        if (_RST_ADORNMENT.match(lines[i]) and title.strip() and not _RST_ADORNMENT.match(title)
                and len(lines[i].rstrip()) >= len(title.strip())):
            overlined = i >= 2 and lines[i - 2].rstrip() == lines[i].rstrip()
            starts.append((i - 2 if overlined else i - 1, title.strip()))
            i += 2
            continue
        i += 1
    return _line_sections(path, "rst", lines, starts)


# --- Python: the module part, then each top-level definition ------------------------------------------------------

def _python_sections(path: str, text: str) -> list[Section]:
    lines = text.split("\n")
    try:
        tree = ast.parse(text, filename=path)
    except (SyntaxError, ValueError):  # Python 2 or broken code: still text worth finding, as one section
        return _line_sections(path, "py", lines, [])
    starts: list[tuple[int, str]] = [(0, "")]
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            begin = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1
            while begin > 0 and lines[begin - 1].lstrip().startswith("#"):  # its comment block belongs to it
                begin -= 1
            starts.append((begin, node.name))
            starts.append((node.end_lineno, ""))  # what follows, up to the next definition, is module code
    starts = [s for i, s in enumerate(starts) if i + 1 == len(starts) or starts[i + 1][0] != s[0]]
    return _line_sections(path, "py", lines, starts)


# --- HTML: main text per heading, spans in source lines ------------------------------------------------------------

def _html_sections(path: str, text: str) -> list[Section]:
    from bs4 import BeautifulSoup, Comment, Declaration, Doctype, ProcessingInstruction

    soup = BeautifulSoup(text, "html.parser")
    for tag in soup(_HTML_DROPPED):
        tag.decompose()
    root = soup.find("main") or soup.find("article") or soup.body or soup
    last_line = text.rstrip().count("\n") + 1
    sections: list[dict] = [{"title": (soup.title.get_text(" ", strip=True) if soup.title else ""), "line": 1,
                             "lines": [], "heading": None}]
    block = None
    for string in root.find_all(string=True):
        if isinstance(string, (Comment, Declaration, Doctype, ProcessingInstruction)) or string.find_parent("title"):
            continue
        piece = " ".join(string.split())
        if not piece:
            continue
        heading = string.find_parent(_HTML_HEADINGS)
        if heading is not None and heading is not sections[-1]["heading"]:
            sections.append({"title": heading.get_text(" ", strip=True), "line": heading.sourceline or 1,
                             "lines": [], "heading": heading})
            block = None
        parent = string.find_parent(_HTML_BLOCKS)
        current = sections[-1]["lines"]
        if parent is block and current:
            current[-1] += " " + piece
        else:
            current.append(piece)
        block = parent
    found = []
    for this, following in zip(sections, [*sections[1:], None]):
        body = "\n".join(this["lines"])
        end = max(this["line"], (following["line"] - 1) if following else last_line)
        if body.strip():
            found.append(Section(path, "html", this["title"], body, (this["line"], end), "lines"))
    return found


# --- PDF: text per page -----------------------------------------------------------------------------------------------

def _pdf_sections(path: str, data: bytes) -> tuple[list[Section], list[Skipped]]:
    import io
    import logging

    from pypdf import PdfReader

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # a damaged file is reported once, as a skip, not warned about
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            return [], [Skipped(path, "encrypted PDF")]
        pages = [page.extract_text() or "" for page in reader.pages]
    except Exception as exc:  # noqa: BLE001 - pypdf raises many types for damaged files; each is this file's problem
        return [], [Skipped(path, f"corrupt PDF ({type(exc).__name__}: {exc})")]
    sections = [Section(path, "pdf", "", text, (number, number), "page")
                for number, text in enumerate(pages, 1) if text.strip()]
    if not sections:
        return [], [Skipped(path, f"PDF without extractable text ({len(pages)} pages; scanned images?)")]
    return sections, []


# --- JSON Lines: a row per section ------------------------------------------------------------------------------------

def _jsonl_sections(path: str, text: str) -> tuple[list[Section], list[Skipped]]:
    sections, skipped = [], []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            skipped.append(Skipped(f"{path}:{number}", f"not valid JSON ({exc.msg})"))
            continue
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            skipped.append(Skipped(f"{path}:{number}", 'expected a JSON object with a string "text" field'))
            continue
        if not row["text"].strip():
            continue
        metadata = {key: value for key, value in row.items() if key != "text"}
        title = row["title"] if isinstance(row.get("title"), str) else ""
        sections.append(Section(path, "jsonl", title, row["text"], (number, number), "row", metadata=metadata))
    return sections, skipped
