"""Chunking: token windows that cover a section in order with the declared overlap, nothing lost, none too long."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepseek.config import ConfigError
from deepseek.rag.chunk import chunk_section, text_hash
from deepseek.rag.ingest import Section, read_sections


class WhitespaceTokenizer:
    """One token per run of non-space characters, plus two specials (like [CLS] and [SEP])."""

    def tokenize_offsets(self, text):
        return [m.span() for m in re.finditer(r"\S+", text)]

    def count_tokens(self, texts):
        return [len(self.tokenize_offsets(t)) + 2 for t in texts]


class CharacterTokenizer(WhitespaceTokenizer):
    """One piece per non-space character, so a word is a run of joined pieces (like WordPiece's ``##`` pieces)."""

    def tokenize_offsets(self, text):
        return [(i, i + 1) for i, char in enumerate(text) if not char.isspace()]


def text_section(text, first_line=1):
    return Section("doc.txt", "txt", "", text, (first_line, first_line + text.count("\n")), "lines",
                   first_line=first_line)


def check_chunks(section, chunks, tokenizer, max_tokens, overlap, exact_overlap=True):
    """The properties every chunking must have; returns each chunk's token indices."""
    offsets = tokenizer.tokenize_offsets(section.text)
    covered = []
    for chunk in chunks:
        assert chunk.text == section.text[chunk.start:chunk.end] and chunk.hash == text_hash(chunk.text)
        assert tokenizer.count_tokens([chunk.text])[0] <= max_tokens
        tokens = [i for i, (a, b) in enumerate(offsets) if chunk.start <= a and b <= chunk.end]
        assert tokens == list(range(tokens[0], tokens[-1] + 1))  # contiguous
        covered.append(tokens)
        first = section.first_line + section.text.count("\n", 0, chunk.start)
        assert chunk.span == (first, first + chunk.text.count("\n"))
    assert sorted({t for tokens in covered for t in tokens}) == list(range(len(offsets)))  # nothing lost
    for before, after in zip(covered, covered[1:]):
        assert before[0] < after[0] and after[-1] > before[-1]  # in order, each adds something
        shared = len(set(before) & set(after))
        assert shared == overlap if exact_overlap else overlap <= shared <= 2 * overlap
    return covered


words = st.text(alphabet="abcxyz.,", min_size=1, max_size=6)
separators = st.sampled_from([" ", " ", " ", "\n", "\n\n", "  \t"])


@settings(max_examples=150, deadline=None)
@given(pieces=st.lists(st.tuples(words, separators), min_size=0, max_size=120),
       max_tokens=st.integers(4, 40), overlap_share=st.floats(0, 0.5), first_line=st.integers(1, 50))
def test_chunks_cover_the_section_in_order_with_the_declared_overlap(pieces, max_tokens, overlap_share, first_line):
    tokenizer = WhitespaceTokenizer()
    text = "".join(word + sep for word, sep in pieces)
    overlap = int(overlap_share * (max_tokens - 2))
    section = text_section(text, first_line)
    chunks = chunk_section(section, tokenizer, max_tokens=max_tokens, overlap_tokens=overlap)
    assert bool(chunks) == bool(text.strip())
    check_chunks(section, chunks, tokenizer, max_tokens, overlap)


def test_a_section_that_fits_is_one_chunk_and_cuts_prefer_line_ends():
    tokenizer = WhitespaceTokenizer()
    short = text_section("def f():\n    return 1\n", first_line=10)
    assert [(c.text, c.span) for c in chunk_section(short, tokenizer, max_tokens=20, overlap_tokens=2)] == [
        ("def f():\n    return 1", (10, 11))]
    lines = "\n".join(f"w{i} " + "x " * 5 for i in range(30))  # six tokens a line
    chunks = chunk_section(text_section(lines), tokenizer, max_tokens=22, overlap_tokens=3)
    assert all(c.text.endswith("x") for c in chunks)  # 20-token windows end where a line ends (18 tokens)
    assert len(tokenizer.tokenize_offsets(chunks[0].text)) == 18


def test_indentation_before_a_chunk_start_is_kept():
    code = "def f():\n" + "".join(f"    step_{i}()\n" for i in range(20))
    chunks = chunk_section(text_section(code), WhitespaceTokenizer(), max_tokens=8, overlap_tokens=0)
    assert chunks[1].text.startswith("    step_")


def test_one_word_longer_than_the_window_is_cut_inside_and_still_fits():
    tokenizer = CharacterTokenizer()
    section = text_section("short " + "a" * 100 + " tail")
    chunks = chunk_section(section, tokenizer, max_tokens=12, overlap_tokens=3)
    check_chunks(section, chunks, tokenizer, 12, 3, exact_overlap=False)
    assert "".join(c.text for c in chunks).count("a") >= 100


def test_chunks_never_cross_a_section(tmp_path):
    path = tmp_path / "guide.md"
    path.write_text("# One\n" + "alpha " * 30 + "\n# Two\n" + "beta " * 30 + "\n")
    tokenizer = WhitespaceTokenizer()
    for section in read_sections(str(path))[0]:
        chunks = chunk_section(section, tokenizer, max_tokens=12, overlap_tokens=2)
        assert len(chunks) > 1 and all(c.text in section.text for c in chunks)
        assert {w for c in chunks for w in c.text.split()} <= set(section.text.split())


def test_sections_without_lines_give_their_own_span():
    section = Section("faq.jsonl", "jsonl", "", "one two three four five six", (4, 4), "row")
    chunks = chunk_section(section, WhitespaceTokenizer(), max_tokens=5, overlap_tokens=1)
    assert len(chunks) == 3 and {c.span for c in chunks} == {(4, 4)}


@pytest.mark.parametrize("max_tokens, overlap, message", [
    (2, 0, "leaves no room for text"), (10, 5, "overlap_tokens must be in \\[0, 4\\]"), (10, -1, "overlap_tokens")])
def test_sizes_that_cannot_work_are_config_errors(max_tokens, overlap, message):
    with pytest.raises(ConfigError, match=message):
        chunk_section(text_section("a b c"), WhitespaceTokenizer(), max_tokens=max_tokens, overlap_tokens=overlap)


@pytest.fixture(scope="module")
def minilm():
    from deepseek.rag.embed import Embedder

    return Embedder.load(precision="fp32")


real_words = st.one_of(
    st.sampled_from(["def", "return", "unbelievably", "tokenization", "get_user_id", "HTTPServer", "naïve", "café",
                     "x", "(", "):", "==", "3.14159", "#", '"""Docstring."""', "日本語", "🙂", "----------"]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_", min_size=1, max_size=40))


@settings(max_examples=60, deadline=None)
@given(pieces=st.lists(st.tuples(real_words, separators), min_size=1, max_size=150),
       max_tokens=st.integers(6, 64), overlap_share=st.floats(0, 0.5))
def test_with_the_model_tokenizer_every_chunk_fits_and_the_overlap_is_at_least_declared(
        minilm, pieces, max_tokens, overlap_share):
    text = "".join(word + sep for word, sep in pieces)
    overlap = int(overlap_share * (max_tokens - 2))
    section = text_section(text)
    chunks = chunk_section(section, minilm, max_tokens=max_tokens, overlap_tokens=overlap)
    assert all(minilm.count_tokens([c.text])[0] <= max_tokens for c in chunks)
    offsets = minilm.tokenize_offsets(text)
    covered = [[i for i, (a, b) in enumerate(offsets) if c.start <= a and b <= c.end] for c in chunks]
    assert sorted({i for tokens in covered for i in tokens}) == list(range(len(offsets)))  # nothing lost
    def at_words(chunk):  # starts and ends between words (not inside a word longer than the window)
        return text[chunk.start - 1].isspace() and (chunk.end == len(text) or text[chunk.end].isspace())

    for before, after, chunk_before, chunk_after in zip(covered, covered[1:], chunks, chunks[1:]):
        assert before[0] < after[0] and after[-1] > before[-1]
        if at_words(chunk_after) and (chunk_before.start == 0 or at_words(chunk_before)):
            assert len(set(before) & set(after)) >= overlap  # between words: at least the declared overlap


def test_stdlib_module_chunks_fit_the_model(minilm):
    import json.decoder

    sections, _ = read_sections(json.decoder.__file__)
    for section in sections:
        for chunk in chunk_section(section, minilm, max_tokens=256, overlap_tokens=32):
            assert minilm.count_tokens([chunk.text])[0] <= 256
            assert chunk.text.strip() and chunk.text in section.text
