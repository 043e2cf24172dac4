"""Tokenizers in Hugging Face ``tokenizers`` format.

``byte_tokenizer()`` maps every byte to its own token (plus special tokens): it needs no training,
never produces unknown tokens, and is what tests and untrained models use.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)


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


def special_token_id(tokenizer: Tokenizer, token: str) -> int | None:
    """The id of a special token, or None if the tokenizer does not have it."""
    return tokenizer.token_to_id(token)
