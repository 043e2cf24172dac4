"""Tokenizers in Hugging Face ``tokenizers`` format.

``byte_tokenizer()`` maps every byte to its own token (plus special tokens): it needs no training,
never produces unknown tokens, and is what tests and untrained models use.

``train_tokenizer()`` learns a byte-level BPE on a corpus. Its alphabet is all 256 bytes, so it too
never produces unknown tokens and decodes every encoding back to the exact text (spaces, tabs,
indentation included). Its special tokens come first, with stable ids: ``<|bos|>`` 0, ``<|eos|>`` 1,
``<|pad|>`` 2, ``<|system|>`` 3, ``<|user|>`` 4, ``<|assistant|>`` 5, ``<|end|>`` 6.

Like every Hugging Face tokenizer, ``encode`` turns text that spells a special token (``"<|eos|>"``)
into that special token, and ``decode`` drops special tokens unless ``skip_special_tokens=False`` (which
gives the exact text back). ``prepare`` encodes corpus text with special-token matching off, so a
document that merely mentions ``<|eos|>`` stays plain text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from deepseek.data.errors import DataError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"  # chat roles
TRAINED_SPECIAL_TOKENS = (BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the ByteLevel alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def byte_tokenizer() -> Tokenizer:
    """A byte-level tokenizer: ids 0..255 are the bytes, then ``<|bos|>``, ``<|eos|>``, ``<|pad|>`` (vocab 259)."""
    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, *,
                    special_tokens: Sequence[str] = TRAINED_SPECIAL_TOKENS, min_frequency: int = 2,
                    show_progress: bool = False) -> Tokenizer:
    """Learn a byte-level BPE tokenizer of ``vocab_size`` tokens from ``texts`` (streamed, any iterable).

    Ids: the special tokens first (in the given order), then the 256 bytes, then the learned merges.
    The vocabulary can come out smaller than ``vocab_size`` when the corpus has too few pairs occurring
    ``min_frequency`` times. Training runs in Rust on all cores.
    """
    special_tokens = list(special_tokens)
    floor = 256 + len(special_tokens)
    if vocab_size <= floor:
        raise ValueError(f"vocab_size must be more than 256 bytes + {len(special_tokens)} special tokens = {floor} "
                         f"(got {vocab_size})")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer_file(path: str | Path) -> Tokenizer:
    """Read a ``tokenizer.json`` file (or the ``tokenizer.json`` inside a folder)."""
    file = Path(path)
    if file.is_dir():
        file = file / "tokenizer.json"
    if not file.is_file():
        raise DataError(f"{file}: no such tokenizer file")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
        raise DataError(f"{file} is not a valid tokenizer.json: {exc}") from exc


def special_token_id(tokenizer: Tokenizer, token: str) -> int | None:
    """The id of a special token, or None if the tokenizer does not have it."""
    return tokenizer.token_to_id(token)
