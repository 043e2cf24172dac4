"""Data: tokenizers, corpus reading, tokenizing into prepared datasets, and loading batches."""

from deepseek.data.errors import DataError
from deepseek.data.loader import Batch, EvalBatches, TokenDataset, TokenLoader, eval_batches
from deepseek.data.prepare import is_validation_document, prepare
from deepseek.data.timeseries import BalancedBatches, Standardizer, TimeSeriesSampler
from deepseek.data.sources import (STDLIB_EXCLUDE, TEXT_SUFFIXES, Document, iter_documents, python_stdlib_dir,
                                   resolve_sources)
from deepseek.data.tokenizer import (ASSISTANT, BOS, END, EOS, PAD, SPECIAL_TOKENS, SYSTEM, TRAINED_SPECIAL_TOKENS,
                                     USER, byte_tokenizer, load_tokenizer_file, special_token_id, train_tokenizer)

__all__ = [
    "ASSISTANT", "BOS", "END", "EOS", "PAD", "SPECIAL_TOKENS", "SYSTEM", "TRAINED_SPECIAL_TOKENS", "USER",
    "BalancedBatches", "Batch", "DataError", "Document", "EvalBatches", "STDLIB_EXCLUDE", "TEXT_SUFFIXES", "TokenDataset", "TokenLoader",
    "byte_tokenizer", "eval_batches", "is_validation_document", "iter_documents", "load_tokenizer_file",
    "prepare", "python_stdlib_dir", "resolve_sources", "Standardizer", "TimeSeriesSampler", "special_token_id", "train_tokenizer",
]
