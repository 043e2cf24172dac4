"""The BM25 tokenizer: identifiers give themselves and their parts, plurals fold, documents and queries agree, and
an index records the tokenizer that made its terms."""

import json

import pytest

from deepseek.rag.index import KnowledgeIndex, StaleIndexError, build_index
from deepseek.rag.lexical import LEGACY_TOKENIZER, TOKENIZER, bm25_tokens, fold_plural, word_terms


@pytest.mark.parametrize("word, terms", [
    ("count_lines", ["count_lines", "count", "lines"]),
    ("HTTPServer", ["httpserver", "http", "server"]),
    ("getUserId", ["getuserid", "get", "user", "id"]),
    ("sha256", ["sha256", "sha", "256"]),
    ("UTF8Decoder", ["utf8decoder", "utf", "8", "decoder"]),
    ("b2a_base64", ["b2a_base64", "b2a", "b", "2", "a", "base64", "base", "64"]),  # snake_case segments kept whole
    ("__init__", ["init"]),
    ("parse", ["parse"]),
    ("größe_maß", ["größe_maß", "größe", "maß"]),  # other scripts: split on underscores only
])
def test_word_terms(word, terms):
    assert word_terms(word) == terms


@pytest.mark.parametrize("term, folded", [("lines", "line"), ("entries", "entry"), ("classes", "class"),
                                          ("status", "status"), ("class", "class"), ("has", "has"),
                                          ("count_lines", "count_line"), ("256", "256")])
def test_fold_plural(term, folded):
    assert fold_plural(term) == folded


def test_bm25_tokens_lower_case_drop_stop_words_and_single_letters():
    assert bm25_tokens(["Return the number of lines in a file", "def count_lines(f): return len(f.readlines())"]) == [
        ["return", "number", "line", "file"],
        ["def", "count_line", "count", "line", "return", "len", "readline"]]


def write_code(folder):
    folder.mkdir()
    (folder / "tools.py").write_text(
        "def count_lines(path):\n    with open(path) as f:\n        return sum(1 for _ in f)\n\n\n"
        "def parseHTTPHeader(raw):\n    name, _, value = raw.partition(':')\n    return name.strip(), value.strip()\n\n\n"
        "def total(values):\n    return sum(values)\n\n\n"
        "def b2a_base64(data):\n    return binascii.b2a_base64(data)\n")
    return folder


def test_a_word_of_a_query_finds_the_identifier_that_holds_it(tmp_path, embedder):
    out = tmp_path / "kb"
    build_index([write_code(tmp_path / "code")], out, embedder=embedder, max_tokens=24, overlap_tokens=0,
                progress=False)
    index = KnowledgeIndex.open(out, embedder=embedder)
    assert json.loads((out / "manifest.json").read_text())["bm25"]["tokenizer"] == TOKENIZER
    for query, title in [("how many lines", "count_lines"), ("read an http header", "parseHTTPHeader"),
                         ("encode in base64", "b2a_base64")]:
        [hits] = index.lexical([query], k=3)
        assert index.chunks[hits[0][0]].title == title, query


def test_an_index_of_another_tokenizer_is_refused_until_rebuilt(tmp_path, embedder):
    code, out = write_code(tmp_path / "code"), tmp_path / "kb"
    build_index([code], out, embedder=embedder, max_tokens=24, overlap_tokens=0, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["bm25"]["tokenizer"]  # what an index of the first version holds
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StaleIndexError, match=f"built with tokenizer {LEGACY_TOKENIZER}, this version queries "
                                              f"with {TOKENIZER}: run `ds rag index SOURCES --out"):
        KnowledgeIndex.open(out, embedder=embedder)
    summary = build_index([code], out, embedder=embedder, progress=False)  # the update rebuilds BM25 only
    assert summary["embedded"] == 0 and summary["unchanged"] == [str(code / "tools.py")]
    assert KnowledgeIndex.open(out, embedder=embedder).manifest["bm25"]["tokenizer"] == TOKENIZER
