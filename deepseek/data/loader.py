"""Reading prepared datasets (see ``prepare.py``) as training and evaluation batches.

``TokenDataset`` memory-maps one split of a prepared folder. ``TokenLoader`` mixes several of them
by weight into batches of fixed-length windows, optionally following a sequence-length curriculum,
and resumes exactly from a small JSON-able state. ``eval_batches`` walks a split in order, scoring
every token once.

Sampling, and why it resumes exactly: a source of N tokens read at length L is cut into
N // (L + 1) non-overlapping windows of L + 1 tokens (inputs are the first L, targets the last L),
visited in a permutation drawn from ``default_rng([seed, source, epoch, L])``; a cursor walks the
permutation, and when it runs out the epoch goes up and a new permutation starts. When the
curriculum changes L, every source starts a fresh pass (cursor 0, next epoch). Which source feeds
each row of step s is drawn from ``default_rng([seed, s])``, a pure function of the step. So the
whole state is the step and, per source, (epoch, cursor, L). Data parallel ranks all compute the
same global batch and keep their own rows: N ranks together read exactly what one process reads.
"""

from __future__ import annotations

import bisect
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from deepseek.data.errors import DataError
from deepseek.data.prepare import DOCUMENTS, FORMAT, FORMAT_VERSION, INDEX, TOKENIZER
from deepseek.data.tokenizer import load_tokenizer_file

# Domain tags keep the mixing and permutation seeds apart.
_MIX, _PERMUTE = 0, 1


class TokenDataset:
    """One split of a prepared dataset folder, memory-mapped: a flat sequence of ``len(self)`` token ids.

    Raises :class:`DataError` naming the file when ``index.json`` or a shard is missing, malformed,
    or of another size than the index says.
    """

    def __init__(self, path: str | Path, split: str = "train"):
        self.path, self.split = Path(path), split
        index_file = self.path / INDEX
        if not index_file.is_file():
            raise DataError(f"{index_file} is missing: {self.path} is not a prepared dataset "
                            "(make one with deepseek.data.prepare)")
        try:
            index = json.loads(index_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{index_file} is corrupt: not valid JSON ({exc})") from exc
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise DataError(f"{index_file}: not a {FORMAT!r} index")
        if not isinstance(index.get("version"), int) or index["version"] > FORMAT_VERSION:
            raise DataError(f"{index_file}: version {index.get('version')!r} is not one this framework reads "
                            f"(up to {FORMAT_VERSION})")
        splits = index.get("splits") if isinstance(index.get("splits"), dict) else {}
        if split not in splits:
            raise DataError(f"{index_file} has no split {split!r} (it has: {', '.join(splits) or 'none'})")
        try:
            info = splits[split]
            dtype = np.dtype(index["dtype"]).newbyteorder("<")
            self.vocab_size, self.eos_id = int(index["vocab_size"]), int(index["eos_id"])
            self.num_tokens, self.num_documents = int(info["tokens"]), int(info["documents"])
            self.num_bytes = int(info["bytes"])
            shards = [(str(s["file"]), int(s["tokens"])) for s in info["shards"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{index_file} is corrupt: bad or missing field {exc}") from exc
        self.dtype, self.index = dtype, index
        self._shards: list[np.ndarray] = []
        self._offsets = [0]  # shard i holds tokens [offsets[i], offsets[i + 1])
        for name, tokens in shards:
            file = self.path / name
            if not file.is_file():
                raise DataError(f"{file} is missing (listed in {index_file})")
            size = file.stat().st_size
            if size != tokens * dtype.itemsize:
                raise DataError(f"{file} is corrupt or truncated: {size} bytes, but {index_file} lists "
                                f"{tokens} tokens of {dtype.itemsize} bytes")
            if tokens:
                self._shards.append(np.memmap(file, dtype=dtype, mode="r"))
                self._offsets.append(self._offsets[-1] + tokens)
        if self._offsets[-1] != self.num_tokens:
            raise DataError(f"{index_file} is corrupt: the {split} shards hold {self._offsets[-1]} tokens, "
                            f"the split says {self.num_tokens}")
        self._document_ends: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return f"TokenDataset({str(self.path)!r}, split={self.split!r}, tokens={self.num_tokens})"

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` (a read-only view of the memory map unless the range spans shards)."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"slice [{start}, {stop}) is outside the {self.num_tokens} tokens of {self!r}")
        i = bisect.bisect_right(self._offsets, start) - 1
        if i == len(self._shards):  # start == stop == len(self)
            return np.zeros(0, self.dtype)
        if stop <= self._offsets[i + 1]:  # the common case: within one shard
            return self._shards[i][start - self._offsets[i]:stop - self._offsets[i]]
        pieces = []
        while start < stop:
            end = min(stop, self._offsets[i + 1])
            pieces.append(self._shards[i][start - self._offsets[i]:end - self._offsets[i]])
            start, i = end, i + 1
        return np.concatenate(pieces)

    @property
    def document_ends(self) -> np.ndarray:
        """uint64 end offset of every document: document i is tokens ``[ends[i - 1], ends[i])`` (ends with EOS)."""
        if self._document_ends is None:
            file = self.path / self.split / DOCUMENTS
            try:
                ends = np.load(file, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise DataError(f"{file} is missing or corrupt: {exc}") from exc
            if len(ends) != self.num_documents or (len(ends) and int(ends[-1]) != self.num_tokens):
                raise DataError(f"{file} is corrupt: it does not match the {self.num_documents} documents and "
                                f"{self.num_tokens} tokens in {self.path / INDEX}")
            self._document_ends = ends
        return self._document_ends

    @property
    def tokenizer_path(self) -> Path:
        """The ``tokenizer.json`` that made these tokens."""
        return self.path / TOKENIZER

    def tokenizer(self) -> Tokenizer:
        """The tokenizer that made these tokens (read from ``tokenizer_path``)."""
        return load_tokenizer_file(self.tokenizer_path)


@dataclass
class Batch:
    """One step's rows: ``inputs`` and ``targets`` are int64 [B, T], targets being inputs shifted by one.

    ``B`` is this rank's share of the global batch; ``source_counts`` counts its rows per source.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    step: int
    seq_len: int
    source_counts: dict[str, int]


def _normalize_sources(sources) -> list[tuple[str, Path, float]]:
    if isinstance(sources, (str, Path)):
        return [("data", Path(sources), 1.0)]
    if not isinstance(sources, Mapping) or not sources:
        raise ValueError("sources must be a prepared dataset path or a non-empty dict {name: path or (path, weight)}")
    normalized = []
    for name, value in sources.items():
        if isinstance(value, (str, Path)):
            value = (value, 1.0)
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise ValueError(f"source {name!r}: expected a path or (path, weight), got {value!r}")
        path, weight = value
        if not isinstance(weight, numbers.Real) or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"source {name!r}: weight must be a positive number, got {weight!r}")
        normalized.append((str(name), Path(path), float(weight)))
    return normalized


def _normalize_curriculum(seq_len: Optional[int], curriculum) -> list[tuple[int, int]]:
    if (seq_len is None) == (curriculum is None):
        raise ValueError("give exactly one of seq_len and curriculum")
    stages = [(0, seq_len)] if curriculum is None else [tuple(stage) for stage in curriculum]
    if not stages or stages[0][0] != 0:
        raise ValueError(f"curriculum must start at step 0, got {curriculum!r}")
    for i, (step, length) in enumerate(stages):
        if not isinstance(length, numbers.Integral) or length < 1 or not isinstance(step, numbers.Integral):
            raise ValueError(f"curriculum stage {(step, length)!r}: step and seq_len must be integers, seq_len >= 1")
        if i and step <= stages[i - 1][0]:
            raise ValueError(f"curriculum steps must increase, got {[s for s, _ in stages]}")
    return [(int(step), int(length)) for step, length in stages]


class TokenLoader:
    """Batches of ``batch_size`` windows from one or several prepared datasets, mixed by weight.

    ``sources``: a prepared folder, or ``{name: path}`` / ``{name: (path, weight)}``; each row comes from
    a source with probability proportional to its weight. ``seq_len`` fixes the length; or
    ``curriculum=[(0, 128), (200, 512)]`` uses 128 from step 0 and 512 from step 200. With ``world_size``
    ranks, each gets rows ``[rank * B / W, (rank + 1) * B / W)`` of the same global batch. Sources must
    share a tokenizer. Deterministic for a seed (on one numpy version), and ``load_state_dict`` of a
    ``state_dict`` taken after k batches continues exactly as an uninterrupted loader would.
    """

    def __init__(self, sources: str | Path | Mapping[str, Any], *, batch_size: int, seq_len: Optional[int] = None,
                 curriculum: Optional[Sequence[tuple[int, int]]] = None, split: str = "train", seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or batch_size % world_size:
            raise ValueError(f"need batch_size >= 1 divisible by world_size and 0 <= rank < world_size; got "
                             f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.batch_size, self.seed, self.rank, self.world_size, self.split = batch_size, seed, rank, world_size, split
        self.curriculum = _normalize_curriculum(seq_len, curriculum)
        normalized = _normalize_sources(sources)
        self.names = [name for name, _, _ in normalized]
        self.datasets = [TokenDataset(path, split) for _, path, _ in normalized]
        weights = np.array([w for _, _, w in normalized])
        self.weights = dict(zip(self.names, weights.tolist()))
        self._probs = weights / weights.sum()
        self._check_datasets()
        self.step = 0
        first = self.seq_len_at(0)
        self._sources = [{"epoch": 0, "cursor": 0, "seq_len": first} for _ in self.datasets]
        self._permutations: dict[int, tuple[int, int, np.ndarray]] = {}  # source -> (epoch, seq_len, order)

    def _check_datasets(self) -> None:
        longest = max(length for _, length in self.curriculum)
        for name, ds in zip(self.names, self.datasets):
            if ds.num_tokens < longest + 1:
                raise DataError(f"source {name!r} ({ds.path}, split {self.split!r}) has {ds.num_tokens} tokens, "
                                f"fewer than one window of seq_len + 1 = {longest + 1}")
        first = self.datasets[0]
        for name, ds in zip(self.names[1:], self.datasets[1:]):
            if (ds.vocab_size, ds.eos_id) != (first.vocab_size, first.eos_id) or \
                    _vocab(ds.tokenizer_path) != _vocab(first.tokenizer_path):
                raise DataError(f"source {name!r} ({ds.path}) was tokenized with another tokenizer than "
                                f"{self.names[0]!r} ({first.path}): sources must share one")

    @property
    def vocab_size(self) -> int:
        return self.datasets[0].vocab_size

    @property
    def eos_id(self) -> int:
        return self.datasets[0].eos_id

    @property
    def tokenizer_path(self) -> Path:
        return self.datasets[0].tokenizer_path

    def seq_len_at(self, step: int) -> int:
        """The sequence length the curriculum uses at ``step``."""
        i = bisect.bisect_right([s for s, _ in self.curriculum], step) - 1
        return self.curriculum[max(i, 0)][1]

    def _next_window(self, source: int, width: int) -> int:
        """The index of the next window of ``source`` (windows of ``width`` tokens), advancing its cursor."""
        state = self._sources[source]
        cached = self._permutations.get(source)
        if cached is None or cached[:2] != (state["epoch"], width - 1):
            count = self.datasets[source].num_tokens // width
            rng = np.random.default_rng([self.seed, _PERMUTE, source, state["epoch"], width - 1])
            cached = (state["epoch"], width - 1, rng.permutation(count))
            self._permutations[source] = cached
        window = int(cached[2][state["cursor"]])
        state["cursor"] += 1
        if state["cursor"] == len(cached[2]):
            state["epoch"], state["cursor"] = state["epoch"] + 1, 0
        return window

    def next_batch(self) -> Batch:
        """This rank's rows of the next global batch."""
        seq_len = self.seq_len_at(self.step)
        width = seq_len + 1
        for state in self._sources:
            if state["seq_len"] != seq_len:  # the curriculum moved on: a fresh pass at the new length
                state["seq_len"], state["cursor"], state["epoch"] = seq_len, 0, state["epoch"] + 1
        if len(self.datasets) == 1:
            choices = [0] * self.batch_size
        else:
            rng = np.random.default_rng([self.seed, _MIX, self.step])
            choices = rng.choice(len(self.datasets), size=self.batch_size, p=self._probs).tolist()
        per_rank = self.batch_size // self.world_size
        first, last = self.rank * per_rank, (self.rank + 1) * per_rank
        rows = np.empty((per_rank, width), dtype=np.int64)
        counts = dict.fromkeys(self.names, 0)
        for row, source in enumerate(choices):  # every rank advances every cursor: B Python steps, not B*T
            window = self._next_window(source, width)
            if first <= row < last:
                rows[row - first] = self.datasets[source].slice(window * width, (window + 1) * width)
                counts[self.names[source]] += 1
        tokens = torch.from_numpy(rows)
        batch = Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), self.step, seq_len, counts)
        self.step += 1
        return batch

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> Batch:  # an endless iterator: ``next(loader)`` is ``loader.next_batch()``
        return self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: the step, and per source its epoch, cursor and window length (JSON-able)."""
        return {"step": self.step, "seed": self.seed,
                "sources": [{"name": name, "tokens": ds.num_tokens, **state}
                            for name, ds, state in zip(self.names, self.datasets, self._sources)]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`; raises ValueError if it was taken with other sources or seed."""
        try:
            saved = [(s["name"], int(s["tokens"])) for s in state["sources"]]
            step, seed = int(state["step"]), state["seed"]
            sources = [{"epoch": int(s["epoch"]), "cursor": int(s["cursor"]), "seq_len": int(s["seq_len"])}
                       for s in state["sources"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a TokenLoader state: {exc!r}") from exc
        ours = [(name, ds.num_tokens) for name, ds in zip(self.names, self.datasets)]
        if saved != ours:
            raise ValueError(f"loader state is for sources (name, tokens) {saved}, this loader reads {ours}")
        if seed != self.seed:
            raise ValueError(f"loader state was saved with seed {seed}, this loader has seed {self.seed}")
        self.step, self._sources = step, sources
        self._permutations.clear()


def _vocab(tokenizer_file: Path) -> dict[str, int]:
    return load_tokenizer_file(tokenizer_file).get_vocab(with_added_tokens=True)


class EvalBatches:
    """A split in order as (inputs, targets) int64 [B, T] batches, every target token scored exactly once.

    Windows of ``seq_len + 1`` tokens at stride ``seq_len`` (consecutive windows share one token, so each
    token after the first is a target once); the tail shorter than a window is dropped; the last batch
    may have fewer rows. Iterate it as often as you like. ``num_targets`` is the number of target
    tokens it yields; ``bits_per_byte(mean_loss)`` converts a mean loss in nats per token.
    """

    def __init__(self, path: str | Path, *, split: str = "val", batch_size: int, seq_len: int,
                 max_batches: Optional[int] = None):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
        self.dataset, self.batch_size, self.seq_len = TokenDataset(path, split), batch_size, seq_len
        self.num_windows = max(self.dataset.num_tokens - 1, 0) // seq_len
        if self.num_windows == 0:
            raise DataError(f"{self.dataset.path} split {split!r} has {self.dataset.num_tokens} tokens, "
                            f"fewer than one window of seq_len + 1 = {seq_len + 1}")
        self.num_batches = -(-self.num_windows // batch_size)
        if max_batches is not None:
            self.num_batches = min(self.num_batches, max_batches)
            self.num_windows = min(self.num_windows, self.num_batches * batch_size)
        self.num_targets = self.num_windows * seq_len

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        L = self.seq_len
        for first in range(0, self.num_windows, self.batch_size):
            last = min(first + self.batch_size, self.num_windows)
            span = self.dataset.slice(first * L, last * L + 1)
            rows = np.lib.stride_tricks.sliding_window_view(span, L + 1)[::L]  # [B, L + 1], overlapping by one
            yield (torch.from_numpy(rows[:, :-1].astype(np.int64, order="C")),
                   torch.from_numpy(rows[:, 1:].astype(np.int64, order="C")))

    @property
    def tokens_per_byte(self) -> float:
        """Tokens per UTF-8 byte of text in the split (each document's EOS counts as a token)."""
        return self.dataset.num_tokens / max(self.dataset.num_bytes, 1)

    def bits_per_byte(self, mean_loss: float) -> float:
        """Bits per byte of text for a mean cross-entropy of ``mean_loss`` nats per token on this split."""
        return mean_loss * self.tokens_per_byte / math.log(2)


def eval_batches(path: str | Path, *, split: str = "val", batch_size: int, seq_len: int,
                 max_batches: Optional[int] = None) -> EvalBatches:
    """The batches of a split for evaluation, in order (see :class:`EvalBatches`): ``for x, y in eval_batches(...)``."""
    return EvalBatches(path, split=split, batch_size=batch_size, seq_len=seq_len, max_batches=max_batches)
