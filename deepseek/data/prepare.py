"""Tokenizing a corpus once, into flat token files that training memory-maps.

    out_dir/
      index.json            format, dtype, vocabulary, and per split: tokens, documents, UTF-8 bytes, shards
      tokenizer.json        the tokenizer that made the tokens
      train/00000.bin ...   raw little-endian token ids (uint16 when the vocabulary fits, else uint32)
      train/documents.npy   uint64 end offset of every document in the split's token stream
      val/...               the same for the validation split

Every document becomes its token ids followed by ``<|eos|>``. A document goes to ``val`` by a stable
hash of its name (blake2b; the same split on every machine and run), so no document is in both
splits. Shards hold whole documents: a shard is closed before the document that would take it past
``shard_tokens``; a single document longer than that gets a shard of its own. The folder is written
atomically: a crash leaves the old folder or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
from tokenizers import Tokenizer

from deepseek.data.errors import DataError
from deepseek.data.sources import Document, read_documents, resolve_sources
from deepseek.data.tokenizer import EOS, load_tokenizer_file
from deepseek.atomic import write_atomically

FORMAT = "deepseek-tokens"
FORMAT_VERSION = 1
INDEX = "index.json"
TOKENIZER = "tokenizer.json"
DOCUMENTS = "documents.npy"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """The on-disk dtype of token ids: little-endian uint16 when every id fits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def is_validation_document(name: str, val_fraction: float) -> bool:
    """Whether the document called ``name`` belongs to the validation split: a stable hash of the name.

    The first 8 bytes of blake2b(name), as a big-endian integer over 2**64, is below ``val_fraction``.
    """
    digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


class _SplitWriter:
    """Appends documents' tokens to one split's shards and records where each document ends."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        (folder / split).mkdir()
        self.shards: list[dict[str, Any]] = []
        self.file = None
        self.ends = array("Q")
        self.tokens = self.bytes = 0

    def add(self, ids: np.ndarray, nbytes: int) -> None:
        if self.file is not None and self.shards[-1]["tokens"] + len(ids) > self.shard_tokens:
            self._close()
        if self.file is None:
            name = f"{self.split}/{len(self.shards):05d}.bin"
            self.file = open(self.folder / name, "wb")
            self.shards.append({"file": name, "tokens": 0})
        self.file.write(ids.tobytes())
        self.shards[-1]["tokens"] += len(ids)
        self.tokens += len(ids)
        self.bytes += nbytes
        self.ends.append(self.tokens)

    def _close(self) -> None:
        self.file.close()
        self.file = None

    def finish(self) -> dict[str, Any]:
        if self.file is not None:
            self._close()
        np.save(self.folder / self.split / DOCUMENTS, np.frombuffer(self.ends, dtype=np.uint64) if self.ends
                else np.zeros(0, np.uint64))
        return {"tokens": self.tokens, "documents": len(self.ends), "bytes": self.bytes, "shards": self.shards}


def _batches(documents: Iterator[Document], batch_bytes: int) -> Iterator[list[Document]]:
    batch, size = [], 0
    for doc in documents:
        if not doc.text:
            continue
        batch.append(doc)
        size += len(doc.text)  # characters: a cheap stand-in for bytes
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _progress(enabled: bool, total: int):
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)
    progress = Progress(TextColumn("tokenizing"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TimeRemainingColumn(), disable=not enabled)
    return progress, progress.add_task("tokenizing", total=total)


def prepare(sources: Sequence[str | Path], tokenizer: Tokenizer | str | Path, out_dir: str | Path, *,
            val_fraction: float = 0.05, shard_tokens: int = 16_777_216, exclude: Sequence[str] = (),
            batch_bytes: int = 4 << 20, progress: bool = True,
            val_names: Optional[Callable[[str], bool]] = None) -> dict[str, Any]:
    """Tokenize the documents of ``sources`` into a prepared dataset folder ``out_dir``; returns its index.

    ``sources`` and ``exclude`` are as for :func:`deepseek.data.iter_documents`. ``tokenizer`` is a
    Tokenizer or the path of a ``tokenizer.json`` (or of a folder holding one); it must have ``<|eos|>``.
    A document goes to ``val`` when ``val_names(name)`` is true, or, without ``val_names``, when the
    hash of its name falls below ``val_fraction``. Text is tokenized ``batch_bytes`` at a time with
    ``encode_batch`` (parallel in Rust); special-token strings inside documents stay plain text.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1 or batch_bytes < 1:
        raise ValueError(f"shard_tokens and batch_bytes must be positive, got {shard_tokens}, {batch_bytes}")
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer_file(tokenizer)
    eos_id = tokenizer.token_to_id(EOS)
    if eos_id is None:
        raise DataError(f"the tokenizer has no {EOS} token, which prepare puts after every document")
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)
    source_list = [sources] if isinstance(sources, (str, Path)) else list(sources)
    files = resolve_sources(source_list, exclude=exclude)  # fails now, before any work, on a missing source
    total_bytes = sum(Path(f).stat().st_size for f in files)

    # A private copy that reads "<|eos|>" in a document as text, and never pads or truncates.
    encoder = Tokenizer.from_str(tokenizer.to_str())
    encoder.encode_special_tokens = True
    encoder.no_padding()
    encoder.no_truncation()
    encode = getattr(encoder, "encode_batch_fast", encoder.encode_batch)  # fast: no offsets (tokenizers >= 0.20)
    in_val = val_names or (lambda name: is_validation_document(name, val_fraction))
    index: dict[str, Any] = {}

    def write_into(folder: Path) -> None:
        writers = {split: _SplitWriter(folder, split, dtype, shard_tokens) for split in SPLITS}
        bar, task = _progress(progress, total_bytes)
        with bar:
            for batch in _batches(read_documents(files), batch_bytes):
                encodings = encode([doc.text for doc in batch], add_special_tokens=False)
                for doc, encoding in zip(batch, encodings):
                    token_ids = encoding.ids  # a fresh Python list on every access
                    ids = np.empty(len(token_ids) + 1, dtype)
                    ids[:-1] = token_ids
                    ids[-1] = eos_id
                    nbytes = len(doc.text.encode("utf-8"))
                    writers["val" if in_val(doc.name) else "train"].add(ids, nbytes)
                    bar.advance(task, nbytes)
            bar.update(task, completed=total_bytes)
        tokenizer.save(str(folder / TOKENIZER))
        index.update({
            "format": FORMAT, "version": FORMAT_VERSION, "dtype": dtype.name, "vocab_size": vocab_size,
            "eos_id": eos_id, "splits": {split: writer.finish() for split, writer in writers.items()},
            "sources": [str(s) for s in source_list], "val_fraction": val_fraction,
        })
        (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")

    write_atomically(out_dir, write_into)
    return index
