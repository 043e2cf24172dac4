"""Incremental detokenization and stop-string matching."""

from hypothesis import assume, given, strategies as st

import deepseek as ds
from deepseek.generate.detokenizer import IncrementalDetokenizer, StopStringMatcher


def test_detokenizer_holds_back_split_utf8_characters():
    tok = ds.byte_tokenizer()
    text = "héllo → wörld 🙂"
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in tok.encode(text).ids]
    assert "".join(deltas) + detok.flush() == text
    assert all("\ufffd" not in d for d in deltas)


@given(st.text(max_size=40))
def test_detokenizer_reassembles_any_text(text):
    assume(not any(special in text for special in ds.data.SPECIAL_TOKENS))  # special tokens decode to nothing
    tok = ds.byte_tokenizer()
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.push(i) for i in tok.encode(text).ids) + detok.flush() == text


def test_stop_matcher_across_deltas_and_partial_holdback():
    m = StopStringMatcher(["</end>"])
    out, done = m.feed("abc</e")
    assert (out, done) == ("abc", False)  # "</e" might start the stop string: held back
    out, done = m.feed("nd> more")
    assert (out, done) == ("", True)
    assert m.text == "abc"


def test_stop_matcher_releases_false_alarm():
    m = StopStringMatcher(["STOP"])
    assert m.feed("xyST") == ("xy", False)
    assert m.feed("ART") == ("START", False)
    assert m.finish() == ""


@given(st.text(alphabet="ab", max_size=30), st.lists(st.integers(1, 5), max_size=10), st.text(alphabet="ab", min_size=1, max_size=3))
def test_stop_matcher_equals_find(text, cuts, stop):
    m = StopStringMatcher([stop])
    emitted, pos, done = "", 0, False
    for size in cuts + [len(text)]:
        piece, done = m.feed(text[pos:pos + size])
        emitted += piece
        pos += size
        if done:
            break
    if not done:
        emitted += m.finish()
    expected = text[: text.find(stop)] if stop in text else text
    assert emitted == expected
