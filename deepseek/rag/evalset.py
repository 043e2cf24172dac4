"""Offline retrieval question sets from what ships with Python: natural language -> code, and prose -> prose.

    write_evalset("evalset", limit=200, seed=0)
    # evalset/corpus/code/...py    the standard library, each question's docstring removed from its function
    # evalset/corpus/topics/*.txt  the reference-manual topics of pydoc_data/topics.py, first sentence removed
    # evalset/code.jsonl           {"query": docstring summary, "relevant": [{"source", "span"}]}
    # evalset/prose.jsonl          {"query": a topic's first sentence, "relevant": [{"source"}]}
    # evalset/manifest.json        counts, seed, limit, Python version

Code (the CodeSearchNet set-up, Husain et al. 2019): the query is a function's docstring summary, the relevant chunk
the one holding the function's ``def`` line. The docstring is removed from the indexed copy, so the match cannot be
verbatim. Every function that qualifies as a question loses its docstring, sampled or not, so the corpus does not
depend on ``seed`` or ``limit``; summaries that occur more than once are dropped (they name no single function).

Prose: each of the ~80 topics is a document; the query is the first sentence of its first prose paragraph (grammar
blocks and sub-headings skipped), removed from the document for the same reason.
"""

from __future__ import annotations

import json
import platform
import random
import re
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

from deepseek.atomic import write_atomically
from deepseek.data.errors import DataError
from deepseek.data.instructions import EXCLUDE, Function, module_name, stdlib_functions
from deepseek.data.sources import python_stdlib_dir, resolve_sources

CODE_FILE, PROSE_FILE, MANIFEST = "code.jsonl", "prose.jsonl", "manifest.json"
CODE_CORPUS, TOPICS_CORPUS = "corpus/code", "corpus/topics"
MIN_QUERY_WORDS, MAX_QUERY_WORDS = 4, 40
_SENTENCE_END = re.compile(r"(?<=[.!?:])\s")
_UNDERLINE = re.compile(r"^\s*([=\-*~^])\1+\s*$")


def first_sentence(paragraph: str) -> str:
    """The first sentence of ``paragraph`` with its whitespace collapsed (up to the first ``.``, ``!``, ``?`` or
    ``:`` followed by a space, else the whole paragraph)."""
    text = " ".join(paragraph.split())
    match = _SENTENCE_END.search(text)
    return text[:match.start()] if match else text


def docstring_summary(docstring: str) -> str:
    """A docstring's summary: the first sentence of its first paragraph (a wrapped summary line is joined)."""
    return first_sentence(docstring.strip().split("\n\n")[0])


def _usable(query: str) -> bool:
    return MIN_QUERY_WORDS <= len(query.split()) <= MAX_QUERY_WORDS and not query.startswith(">>>")


# -- natural language -> code --------------------------------------------------------------------------------------

def code_questions(root: Path, files: Sequence[str], functions: Sequence[Function], limit: Optional[int],
                   seed: int) -> tuple[dict[str, str], list[dict]]:
    """(corpus path -> stripped text, questions). Paths are relative to the question file: ``corpus/code/...``."""
    summaries = {fn: docstring_summary(fn.docstring) for fn in functions}
    counts = Counter(summaries.values())
    chosen = [fn for fn in functions if _usable(summaries[fn]) and counts[summaries[fn]] == 1]
    by_file: dict[str, list[Function]] = {}
    for fn in chosen:
        by_file.setdefault(fn.path, []).append(fn)
    corpus: dict[str, str] = {}
    def_lines: dict[Function, int] = {}
    for path in files:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        for fn in by_file.get(path, ()):
            text = text.replace(fn.source, fn.code, 1)
        for fn in by_file.get(path, ()):
            at = 0 if text.startswith(fn.code) else text.find("\n" + fn.code) + 1
            if at or text.startswith(fn.code):  # not found: line ends other than "\n"; the function is not asked
                def_lines[fn] = text.count("\n", 0, at) + 1
        corpus[f"{CODE_CORPUS}/{Path(path).relative_to(root).as_posix()}"] = text
    sample = _sample([fn for fn in chosen if fn in def_lines], limit, seed)
    questions = [{"query": summaries[fn],
                  "relevant": [{"source": f"{CODE_CORPUS}/{Path(fn.path).relative_to(root).as_posix()}",
                                "span": [def_lines[fn], def_lines[fn]]}],
                  "function": f"{fn.module}.{fn.name}"} for fn in sample]
    return corpus, questions


def _sample(items: list, limit: Optional[int], seed: int) -> list:
    if limit is None or limit >= len(items):
        return list(items)
    picked = sorted(random.Random(seed).sample(range(len(items)), limit))  # keep corpus order: stable diffs
    return [items[i] for i in picked]


# -- prose -> prose ----------------------------------------------------------------------------------------------

def topic_question(text: str) -> Optional[tuple[str, str]]:
    """(query, document without it) of one pydoc topic, or None when it has no prose paragraph to ask from."""
    paragraphs = text.split("\n\n")
    for i, paragraph in enumerate(paragraphs[1:], start=1):  # paragraphs[0] is the title and its underline
        lines = paragraph.split("\n")
        if not lines[0] or lines[0][0].isspace() or any(_UNDERLINE.match(line) for line in lines):
            continue  # a grammar or code block, or a sub-heading
        query = first_sentence(paragraph)
        if not _usable(query):
            continue
        rest = " ".join(paragraph.split())[len(query):].strip()
        document = "\n\n".join([*paragraphs[:i], *([rest] if rest else []), *paragraphs[i + 1:]])
        return query, document
    return None


def prose_questions(limit: Optional[int], seed: int) -> tuple[dict[str, str], list[dict]]:
    """(corpus path -> topic text, questions) over ``pydoc_data.topics``: one document and one question a topic."""
    from pydoc_data.topics import topics

    corpus, questions = {}, []
    for name in sorted(topics):
        asked = topic_question(topics[name])
        if asked is None:
            continue
        source = f"{TOPICS_CORPUS}/{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.txt"
        corpus[source] = asked[1]
        questions.append({"query": asked[0], "relevant": [{"source": source}], "topic": name})
    return corpus, _sample(questions, limit, seed)


def _in_modules(module: str, wanted: Sequence[str]) -> bool:
    return any(module == w or module.startswith(w + ".") for w in wanted)


# -- writing -----------------------------------------------------------------------------------------------------

def write_evalset(out: str | Path, *, limit: Optional[int] = 200, seed: int = 0, root: Optional[str | Path] = None,
                  modules: Optional[Sequence[str]] = None) -> dict:
    """Write both question sets and their corpus into ``out`` (atomically); return the manifest.

    ``root``: the standard library by default; ``modules``: only these dotted modules (and submodules) as code
    corpus and questions; ``limit``: at most that many questions per set, sampled with ``seed``.
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1, got {limit}")
    root = Path(root) if root is not None else python_stdlib_dir()
    functions = stdlib_functions(root, modules=modules)
    files = [f for f in resolve_sources([str(root)], exclude=EXCLUDE) if f.endswith(".py")]
    if modules is not None:
        files = [f for f in files if _in_modules(module_name(Path(f), root), modules)]
    code_corpus, code = code_questions(root, files, functions, limit, seed)
    if not code:
        raise DataError(f"no documented function to ask about under {root}"
                        + (f" in modules {list(modules)}" if modules else ""))
    topic_corpus, prose = prose_questions(limit, seed)
    manifest = {"format": "deepseek-rag-evalset", "version": 1, "seed": seed, "limit": limit,
                "python": platform.python_version(), "root": str(root), "modules": list(modules or []),
                "questions": {CODE_FILE: len(code), PROSE_FILE: len(prose)},
                "corpus": {CODE_CORPUS: len(code_corpus), TOPICS_CORPUS: len(topic_corpus)}}

    def write_into(tmp: Path) -> None:
        for relative, text in {**code_corpus, **topic_corpus}.items():
            path = tmp / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        for name, rows in ((CODE_FILE, code), (PROSE_FILE, prose)):
            (tmp / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

    write_atomically(out, write_into)
    return manifest
