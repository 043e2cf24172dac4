"""Trained byte-level BPE: exact round trips, stable special-token ids, clear errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepseek.data import (ASSISTANT, BOS, END, EOS, PAD, SPECIAL_TOKENS, SYSTEM, TRAINED_SPECIAL_TOKENS, USER,
                           DataError, byte_tokenizer, load_tokenizer_file, special_token_id, train_tokenizer)

CODE = '''\
class Stack:
    """A stack."""

    def __init__(self):
\tself.items = []   # tab-indented on purpose

    def push(self, x):
        if x is None:
            raise ValueError("x")
        self.items.append(x)\r\n
  leading = "  two spaces"  \n\n\n    \t  \n'''


@given(st.text())
@settings(max_examples=300, deadline=None)
def test_round_trip_any_text(tokenizer, text):
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text  # exact, even for text spelling "<|end|>"
    if not any(token in text for token in TRAINED_SPECIAL_TOKENS):
        assert tokenizer.decode(ids) == text


def test_text_spelling_a_special_token_becomes_that_token(tokenizer):
    ids = tokenizer.encode("a<|eos|>b").ids
    assert tokenizer.token_to_id(EOS) in ids  # as with every Hugging Face tokenizer (prepare turns this off)
    assert tokenizer.decode(ids) == "ab" and tokenizer.decode(ids, skip_special_tokens=False) == "a<|eos|>b"


@pytest.mark.parametrize("text", [CODE, " leading space", "\tTab", "\n\nnewlines\n", "    indented", "", " ",
                                  "é ü 中文 😀 \x00\x7f", "def f():\n    return 1\n"])
def test_round_trip_code_and_whitespace(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_round_trip_training_corpus_and_compresses(tokenizer, code_texts):
    for text in code_texts:
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids) == text
        assert len(ids) < 0.6 * len(text.encode())  # merges were learned: well under one token per byte


def test_special_tokens_first_with_stable_ids(tokenizer):
    assert TRAINED_SPECIAL_TOKENS == (BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END)
    assert [special_token_id(tokenizer, t) for t in TRAINED_SPECIAL_TOKENS] == list(range(7))
    assert tokenizer.get_vocab_size() == 400
    ids = tokenizer.encode(f"{USER}hi{END}").ids  # role markers encode as single tokens
    assert ids[0] == 4 and ids[-1] == 6


def test_every_byte_is_in_the_vocabulary(tokenizer):
    raw = bytes(range(256)).decode("latin-1")
    assert None not in tokenizer.encode(raw).ids
    assert tokenizer.decode(tokenizer.encode(raw).ids) == raw


def test_vocab_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="vocab_size must be more than 256 bytes \\+ 7 special tokens = 263"):
        train_tokenizer(["abc"], vocab_size=263)
    assert train_tokenizer(["abc abc"], vocab_size=300, special_tokens=[EOS]).token_to_id(EOS) == 0


def test_training_is_deterministic(code_texts):
    a = train_tokenizer(code_texts[:2], vocab_size=350)
    b = train_tokenizer(code_texts[:2], vocab_size=350)
    assert a.get_vocab() == b.get_vocab()


def test_byte_tokenizer_unchanged():
    tok = byte_tokenizer()
    assert SPECIAL_TOKENS == (BOS, EOS, PAD)
    assert tok.get_vocab_size() == 259 and tok.token_to_id(EOS) == 257
    assert tok.encode("ab").ids == [97, 98]


def test_load_tokenizer_file(tmp_path, tokenizer):
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    for path in (tmp_path / "tokenizer.json", tmp_path):  # the file, or the folder holding it
        assert load_tokenizer_file(path).get_vocab() == tokenizer.get_vocab()
    with pytest.raises(DataError, match="nope.json: no such tokenizer file"):
        load_tokenizer_file(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json is not a valid tokenizer.json"):
        load_tokenizer_file(tmp_path / "bad.json")
