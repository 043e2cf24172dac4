"""Data: tokenizers (and, later, corpus reading, packing and loading)."""

from deepseek.data.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, byte_tokenizer

__all__ = ["BOS", "EOS", "PAD", "SPECIAL_TOKENS", "byte_tokenizer"]
