"""Reading a corpus: files, folders, glob patterns and JSON Lines files, as a stream of documents.

A source is

- a file: read whatever its suffix (``.jsonl`` files are read as JSON Lines, see below);
- a folder: every file under it whose suffix is in ``TEXT_SUFFIXES`` or is ``.jsonl``, recursively,
  skipping hidden files and folders (``.git``, ``.venv``);
- a glob pattern (``"src/**/*.py"``, ``**`` recursive): the files it matches, whatever their suffix
  (the pattern is the filter); folders it matches are skipped.

Order is deterministic: sources in the given order, the files of a folder or glob sorted by path.
A ``.jsonl`` file holds one JSON object per line with a string ``"text"`` field; each line is a
document named ``"{path}:{line}"``. Any other file is one document named by its path (as given or
found, not resolved). Files that are not valid UTF-8 are skipped with a warning.

Files are read one at a time, so a corpus never has to fit in memory.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
import warnings
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import AbstractSet, Iterator, Optional, Sequence

from deepseek.data.errors import DataError

TEXT_SUFFIXES = frozenset({
    # prose and markup
    ".txt", ".text", ".md", ".markdown", ".rst", ".adoc", ".tex", ".org", ".html", ".htm", ".xml", ".css", ".svg",
    # configuration and data
    ".json", ".yaml", ".yml", ".toml", ".cfg", ".ini", ".conf", ".csv", ".tsv", ".proto", ".graphql",
    # code
    ".py", ".pyi", ".pyx", ".pxd", ".ipynb", ".c", ".h", ".cc", ".cpp", ".cxx", ".hh", ".hpp", ".hxx", ".cu", ".cuh",
    ".rs", ".go", ".java", ".kt", ".kts", ".scala", ".swift", ".m", ".mm", ".cs", ".fs", ".vb",
    ".js", ".mjs", ".cjs", ".jsx", ".ts", ".tsx", ".vue", ".svelte", ".php", ".rb", ".pl", ".pm", ".lua", ".r",
    ".jl", ".hs", ".ml", ".mli", ".ex", ".exs", ".erl", ".clj", ".lisp", ".el", ".scm", ".dart", ".zig", ".nim",
    ".sh", ".bash", ".zsh", ".fish", ".ps1", ".bat", ".sql", ".cmake", ".mk", ".gradle", ".dockerfile",
})
JSONL_SUFFIX = ".jsonl"
_FOLDER_SUFFIXES = TEXT_SUFFIXES | {JSONL_SUFFIX}

STDLIB_EXCLUDE = (
    "*/site-packages/*", "*/dist-packages/*", "*/__pycache__/*",
    "*/test/*", "*/tests/*", "*/idle_test/*", "*/lib2to3/tests/*", "*/unittest/test/*",
)
"""``exclude`` patterns that turn ``python_stdlib_dir()`` into a corpus of the standard library
without installed packages or its test suites."""


@dataclass(frozen=True)
class Document:
    """One document of a corpus: ``name`` is its file path (``path:line`` for JSON Lines), ``text`` its text."""

    name: str
    text: str


def python_stdlib_dir() -> Path:
    """The folder of this Python's standard library (e.g. ``/usr/lib/python3.11``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded(path: str, exclude: Sequence[str]) -> bool:
    return any(fnmatchcase(path, pattern) for pattern in exclude)


def walk_folder(folder: str, *, suffixes: Optional[AbstractSet[str]] = None,
                skip_folders: AbstractSet[str] = frozenset()) -> list[str]:
    """The files under ``folder``, recursively and sorted, leaving out hidden files and folders and the folders
    named in ``skip_folders``; with ``suffixes``, only the files whose lower-cased suffix is one of them."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in skip_folders]
        found.extend(os.path.join(root, f) for f in files
                     if not f.startswith(".") and (suffixes is None or os.path.splitext(f)[1].lower() in suffixes))
    return sorted(found)


def source_files(source: str, *, suffixes: Optional[AbstractSet[str]] = None,
                 skip_folders: AbstractSet[str] = frozenset()) -> Optional[list[str]]:
    """The files one source names: itself when it is a file, :func:`walk_folder` of a folder, the files a glob pattern
    matches (sorted); None when it is none of these, so that each caller raises its own error."""
    if os.path.isfile(source):
        return [source]
    if os.path.isdir(source):
        return walk_folder(source, suffixes=suffixes, skip_folders=skip_folders)
    if glob.has_magic(source):
        return sorted(p for p in glob.glob(source, recursive=True) if os.path.isfile(p))
    return None


def resolve_sources(sources: Sequence[str | Path], *, exclude: Sequence[str] = ()) -> list[str]:
    """The files that ``sources`` name, in reading order, minus those matching an ``exclude`` fnmatch pattern.

    Raises :class:`DataError` for a source that matches no file, naming it, before anything is read.
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    files: list[str] = []
    for source in sources:
        source = os.fspath(source)
        found = source_files(source, suffixes=_FOLDER_SUFFIXES)
        if found is None:
            raise DataError(f"no such file, directory or glob match: {source}")
        if not found:
            raise DataError(f"{source}: folder has no text files" if os.path.isdir(source)
                            else f"no such file, directory or glob match: {source}")
        kept = [f for f in found if not _excluded(f, exclude)]
        if not kept:
            raise DataError(f"{source}: every file is excluded by {list(exclude)}")
        files.extend(kept)
    return files


def _read_jsonl(path: str) -> Iterator[Document]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc})") from exc
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: expected a JSON object with a string \"text\" field")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:  # a lone surrogate escape ("\ud800") is no text a tokenizer can take
                raise DataError(f"{path}:{lineno}: \"text\" is not valid unicode ({exc})") from exc
            yield Document(f"{path}:{lineno}", text)


def read_documents(files: Sequence[str]) -> Iterator[Document]:
    """The documents of already resolved ``files`` (see :func:`resolve_sources`), one file at a time."""
    for path in files:
        if path.lower().endswith(JSONL_SUFFIX):
            yield from _read_jsonl(path)
            continue
        try:
            with open(path, encoding="utf-8", newline="") as f:  # newline="": keep \r\n as written
                text = f.read()
        except UnicodeDecodeError as exc:
            warnings.warn(f"skipping {path}: not UTF-8 text ({exc.reason} at byte {exc.start})", stacklevel=2)
            continue
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
        yield Document(path, text)


def iter_documents(sources: Sequence[str | Path], *, exclude: Sequence[str] = ()) -> Iterator[Document]:
    """Stream the :class:`Document` s of ``sources`` (files, folders, globs; see the module docstring).

    Sources are checked when this is called (a missing one raises :class:`DataError` at once);
    files are then read lazily, one at a time.
    """
    return read_documents(resolve_sources(sources, exclude=exclude))
