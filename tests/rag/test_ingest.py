"""Reading sources into sections: every file type's structure and spans, and the files that are skipped (with why)."""

import json
from pathlib import Path

import pytest

from deepseek.rag.ingest import SourceError, expand_sources, file_hash, read_sections
from tests.rag.pdf_fixtures import pdf_bytes

PY_SOURCE = '''"""Module docstring: tools for greeting."""

import os
from typing import Any

GREETING = "hello"


# Say hello to someone.
@staticmethod
def greet(name):
    """Return a greeting for ``name``."""
    return f"{GREETING} {name}"

if __debug__:
    VERBOSE = True

class Greeter:
    """Greets people repeatedly."""

    def __call__(self, name):
        return greet(name)
'''


def lines_of(path: Path, span: tuple[int, int]) -> str:
    return "\n".join(path.read_text().split("\n")[span[0] - 1:span[1]])


def test_python_splits_on_top_level_definitions_with_docstrings_and_exact_lines(tmp_path):
    path = tmp_path / "greet.py"
    path.write_text(PY_SOURCE)
    sections, skipped = read_sections(str(path))
    assert skipped == []
    assert [s.title for s in sections] == ["", "greet", "", "Greeter"]
    module, greet, between, greeter = sections
    assert module.text.startswith('"""Module docstring') and "import os" in module.text and "GREETING =" in module.text
    assert greet.text.startswith("# Say hello to someone.\n@staticmethod\ndef greet(name):")
    assert '"""Return a greeting' in greet.text and "VERBOSE" not in greet.text
    assert between.text.strip() == "if __debug__:\n    VERBOSE = True"
    assert greeter.text.startswith("class Greeter:") and "def __call__" in greeter.text
    for section in sections:  # spans are the file's lines: the text is exactly those lines
        assert section.span_unit == "lines" and section.first_line == section.span[0]
        assert lines_of(path, section.span) == section.text
    assert greet.span == (9, 13)


def test_python_that_does_not_parse_is_one_text_section(tmp_path):
    path = tmp_path / "old.py"
    path.write_text("print 'python 2'\n")
    sections, skipped = read_sections(str(path))
    assert [(s.title, s.text, s.span) for s in sections] == [("", "print 'python 2'", (1, 1))] and not skipped


def test_markdown_splits_on_headings_but_not_inside_code_fences(tmp_path):
    path = tmp_path / "guide.md"
    path.write_text("Intro text.\n\n# Install\n\nRun pip.\n\n```sh\n# not a heading\n```\n\nSetext title\n"
                    "------------\n\nBody.\n\n## Use ##\nCall it.\n")
    sections, _ = read_sections(str(path))
    assert [s.title for s in sections] == ["", "Install", "Setext title", "Use"]
    assert "# not a heading" in sections[1].text
    assert sections[3].text.startswith("## Use ##\nCall it.")
    for section in sections:
        assert lines_of(path, section.span) == section.text


def test_rst_splits_on_underlined_and_overlined_titles(tmp_path):
    path = tmp_path / "manual.rst"
    path.write_text("=====\nTitle\n=====\n\nIntro.\n\nSection one\n-----------\n\nText one.\n\nSub\n~~~\n\nText two.\n")
    sections, _ = read_sections(str(path))
    assert [(s.title, s.span) for s in sections] == [("Title", (1, 5)), ("Section one", (7, 10)), ("Sub", (12, 15))]
    assert sections[0].text.startswith("=====\nTitle\n=====")


def test_html_keeps_the_main_text_per_heading_and_drops_scripts_styles_and_navigation(tmp_path):
    path = tmp_path / "page.html"
    path.write_text("<html><head><title>Page</title><style>p {color: red}</style></head>\n<body>\n"
                    "<nav>Home | About</nav>\n<script>var secret = 1;</script>\n"
                    "<main>\n<p>Lead <b>bold</b> paragraph.</p>\n<h2>First</h2>\n<p>One.</p>\n<ul><li>item a</li>"
                    "<li>item b</li></ul>\n<h2>Second</h2>\n<p>Two.</p>\n</main>\n<footer>Copyright</footer>\n"
                    "</body></html>\n")
    sections, skipped = read_sections(str(path))
    assert not skipped
    assert [(s.title, s.text) for s in sections] == [
        ("Page", "Lead bold paragraph."), ("First", "First\nOne.\nitem a\nitem b"), ("Second", "Second\nTwo.")]
    assert [s.span for s in sections] == [(1, 6), (7, 9), (10, 14)] and sections[0].first_line is None
    everything = " ".join(s.text for s in sections)
    assert not any(word in everything for word in ("secret", "color", "Home", "Copyright"))


def test_pdf_text_per_page_and_a_corrupt_pdf_is_skipped_with_its_reason(tmp_path):
    good = tmp_path / "report.pdf"
    good.write_bytes(pdf_bytes(["Quarterly revenue grew.", "", "Outlook is stable."]))
    sections, skipped = read_sections(str(good))
    assert not skipped
    assert [(s.text, s.span, s.span_unit) for s in sections] == [
        ("Quarterly revenue grew.", (1, 1), "page"), ("Outlook is stable.", (3, 3), "page")]
    corrupt = tmp_path / "broken.pdf"
    corrupt.write_bytes(pdf_bytes(["Some text"])[:200])
    sections, skipped = read_sections(str(corrupt))
    assert sections == [] and len(skipped) == 1
    assert skipped[0].path == str(corrupt) and skipped[0].reason.startswith("corrupt PDF")
    blank = tmp_path / "scan.pdf"
    blank.write_bytes(pdf_bytes(["", ""]))
    assert read_sections(str(blank))[1][0].reason.startswith("PDF without extractable text (2 pages")


def test_jsonl_rows_keep_their_other_fields_as_metadata_and_bad_lines_are_reported_by_line(tmp_path):
    path = tmp_path / "faq.jsonl"
    path.write_text("\n".join([
        json.dumps({"text": "Reset your password from the login page.", "title": "Passwords", "lang": "en"}),
        "{not json",
        json.dumps({"body": "no text field"}),
        "",
        json.dumps({"text": "Invoices are sent monthly.", "id": 7}),
    ]) + "\n")
    sections, skipped = read_sections(str(path))
    assert [(s.text, s.title, s.span, s.span_unit, s.metadata) for s in sections] == [
        ("Reset your password from the login page.", "Passwords", (1, 1), "row", {"title": "Passwords", "lang": "en"}),
        ("Invoices are sent monthly.", "", (5, 5), "row", {"id": 7})]
    assert [s.path for s in skipped] == [f"{path}:2", f"{path}:3"]
    assert skipped[0].reason.startswith("not valid JSON") and '"text" field' in skipped[1].reason


def test_text_file_is_one_section_and_windows_line_ends_are_normalised(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"\xef\xbb\xbfline one\r\nline two\r\n")
    sections, _ = read_sections(str(path))
    assert [(s.text, s.span, s.type) for s in sections] == [("line one\nline two", (1, 2), "txt")]


@pytest.mark.parametrize("name, data, reason", [
    ("blob.txt", b"abc\0\x01\x02binary", "binary file (NUL bytes)"),
    ("latin.md", "café".encode("latin-1"), "not UTF-8 text"),
    ("photo.png", b"\x89PNG\r\n", "unsupported file type .png"),
    ("Makefile", b"all:\n", "unsupported file type (no suffix)"),
])
def test_unreadable_files_are_skipped_with_a_reason(tmp_path, name, data, reason):
    path = tmp_path / name
    path.write_bytes(data)
    sections, skipped = read_sections(str(path))
    assert sections == [] and len(skipped) == 1 and skipped[0].reason.startswith(reason)


def test_sources_expand_folders_recursively_and_globs_without_hidden_entries(tmp_path):
    (tmp_path / "docs" / "deep").mkdir(parents=True)
    (tmp_path / "docs" / ".git").mkdir()
    (tmp_path / "docs" / "__pycache__").mkdir()
    for name in ["docs/a.md", "docs/deep/b.txt", "docs/deep/c.bin", "docs/.hidden.md", "docs/.git/config",
                 "docs/__pycache__/x.pyc", "other.py"]:
        (tmp_path / name).write_text("x")
    files = expand_sources([tmp_path / "docs", str(tmp_path / "*.py"), tmp_path / "docs" / "a.md"])
    assert files == [str(tmp_path / p) for p in ["docs/a.md", "docs/deep/b.txt", "docs/deep/c.bin", "other.py"]]
    assert expand_sources([str(tmp_path / "*.none")]) == []
    with pytest.raises(SourceError, match="no such file, folder or glob match: .*missing"):
        expand_sources([tmp_path / "missing"])


def test_file_hash_is_the_sha256_of_the_bytes(tmp_path):
    import hashlib

    path = tmp_path / "f.txt"
    path.write_bytes(b"abc" * 1000)
    assert file_hash(str(path)) == hashlib.sha256(b"abc" * 1000).hexdigest()
