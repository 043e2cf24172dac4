"""Reading a corpus: folders, globs, JSON Lines, exclusions, and the errors and warnings on bad input."""

from __future__ import annotations

import json
import os
import re

import pytest

from deepseek.data import (STDLIB_EXCLUDE, TEXT_SUFFIXES, DataError, Document, iter_documents, python_stdlib_dir,
                           resolve_sources)


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """A small tree, read from a relative cwd so names are relative paths."""
    monkeypatch.chdir(tmp_path)
    files = {
        "src/b.py": "print('b')\n",
        "src/a.py": "print('a')\n",
        "src/pkg/z.md": "# z\n",
        "src/pkg/test/test_z.py": "assert True\n",
        "src/image.png": "not text by suffix",
        "src/.hidden/h.py": "hidden\n",
        "src/.h.py": "hidden file\n",
        "notes.log": "explicitly named\n",
        "docs.jsonl": '{"text": "first"}\n\n{"text": "", "id": 2}\n{"text": "third", "meta": 1}\n',
    }
    for name, text in files.items():
        os.makedirs(os.path.dirname(name) or ".", exist_ok=True)
        with open(name, "w") as f:
            f.write(text)
    return tmp_path


def names(sources, **kwargs):
    return [doc.name for doc in iter_documents(sources, **kwargs)]


def test_folder_recursive_sorted_text_files_only(corpus):
    assert names(["src"]) == ["src/a.py", "src/b.py", "src/pkg/test/test_z.py", "src/pkg/z.md"]
    assert list(iter_documents(["src/a.py"])) == [Document("src/a.py", "print('a')\n")]


def test_sources_in_given_order_and_explicit_files_any_suffix(corpus):
    assert names(["notes.log", "src/pkg", "src/a.py"]) == ["notes.log", "src/pkg/test/test_z.py", "src/pkg/z.md",
                                                            "src/a.py"]
    assert names("notes.log") == ["notes.log"]  # one source need not be in a list


def test_glob_matches_files_sorted(corpus):
    assert names(["src/**/*.py"]) == ["src/a.py", "src/b.py", "src/pkg/test/test_z.py"]
    assert names(["src/*"]) == ["src/a.py", "src/b.py", "src/image.png"]  # the pattern is the filter; dirs skipped


def test_exclude_patterns(corpus):
    assert names(["src"], exclude=["*/test/*"]) == ["src/a.py", "src/b.py", "src/pkg/z.md"]
    assert names(["src"], exclude=["*.md", "*/b.py"]) == ["src/a.py", "src/pkg/test/test_z.py"]
    with pytest.raises(DataError, match=r"src/pkg/test: every file is excluded by \['\*/test/\*'\]"):
        iter_documents(["src/pkg/test"], exclude=["*/test/*"])


def test_jsonl_lines_are_documents(corpus):
    docs = list(iter_documents(["docs.jsonl"]))
    assert docs == [Document("docs.jsonl:1", "first"), Document("docs.jsonl:3", ""), Document("docs.jsonl:4", "third")]


@pytest.mark.parametrize("line, why", [("{bad json", "not valid JSON"), ('["a list"]', "string \"text\" field"),
                                       ('{"txt": "x"}', "string \"text\" field"), ('{"text": 3}', "string \"text\""),
                                       ('{"text": "\\ud800"}', "not valid unicode")])
def test_bad_jsonl_line_names_file_and_line(corpus, line, why):
    with open("bad.jsonl", "w") as f:
        f.write(json.dumps({"text": "ok"}) + "\n" + line + "\n")
    docs = iter_documents(["bad.jsonl"])
    assert next(docs).text == "ok"
    with pytest.raises(DataError, match=f"bad.jsonl:2: .*{why}"):
        next(docs)


def test_missing_source_fails_before_reading(corpus):
    for missing in ("nope", "nope/*.py", "src/*.rs"):
        with pytest.raises(DataError, match=re.escape(f"no such file, directory or glob match: {missing}")):
            iter_documents(["src", missing])  # raised at the call, not after reading src
    os.mkdir("empty")
    with pytest.raises(DataError, match="empty: folder has no text files"):
        iter_documents(["empty"])


def test_non_utf8_files_are_skipped_with_a_warning(corpus):
    with open("src/latin1.txt", "wb") as f:
        f.write("café".encode("latin-1"))
    with pytest.warns(UserWarning, match="skipping src/latin1.txt: not UTF-8"):
        assert "src/latin1.txt" not in names(["src"])


def test_crlf_kept_as_written(corpus):
    with open("crlf.txt", "wb") as f:
        f.write(b"a\r\nb\r\n")
    assert next(iter_documents(["crlf.txt"])).text == "a\r\nb\r\n"


def test_stdlib_corpus_without_tests():
    files = resolve_sources([python_stdlib_dir()], exclude=STDLIB_EXCLUDE)
    assert len(files) > 200 and any(f.endswith("/textwrap.py") for f in files)
    assert not any("/test/" in f or "/site-packages/" in f or "__pycache__" in f for f in files)
    assert files == sorted(files)
    assert {".py", ".md", ".json", ".rs", ".c"} <= TEXT_SUFFIXES and ".jsonl" not in TEXT_SUFFIXES
