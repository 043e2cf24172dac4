"""Shared data-test setup: a small trained tokenizer and a factory of tiny prepared datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepseek.data import prepare, python_stdlib_dir, train_tokenizer

STDLIB_SAMPLES = ("textwrap.py", "string.py", "shlex.py", "fnmatch.py")


@pytest.fixture(scope="session")
def code_texts() -> tuple[str, ...]:
    """A few standard-library modules: real code with indentation, comments and docstrings."""
    return tuple((python_stdlib_dir() / name).read_text(encoding="utf-8") for name in STDLIB_SAMPLES)


@pytest.fixture(scope="session")
def tokenizer(code_texts):
    """A byte-level BPE of 400 tokens trained on ``code_texts`` (shared by all tests: do not mutate it)."""
    return train_tokenizer(code_texts, vocab_size=400)


@pytest.fixture
def write_jsonl():
    """``write_jsonl(path, texts)``: a JSON Lines file with one ``{"text": ...}`` object per text."""
    def write(path: Path, texts) -> Path:
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        return path
    return write


@pytest.fixture
def make_dataset(tmp_path, tokenizer, write_jsonl):
    """``make_dataset(name, texts, **prepare_kwargs)``: a prepared folder of those documents (all train by default)."""
    def make(name: str, texts, **kwargs) -> Path:
        source = write_jsonl(tmp_path / f"{name}.jsonl", texts)
        kwargs.setdefault("progress", False)
        kwargs.setdefault("val_fraction", 0.0)
        prepare([source], tokenizer, tmp_path / name, **kwargs)
        return tmp_path / name
    return make
