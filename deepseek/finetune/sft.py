"""Supervised fine-tuning data: chats rendered by the serving chat template, loss on assistant tokens only, packing.

Legend: T tokens of a packed row.

Rows of an SFT JSONL file are either OpenAI-style chats ``{"messages": [{"role", "content"}, ...]}`` (what
:mod:`deepseek.data.instructions` writes) or plain pairs ``{"prompt": str, "completion": str}`` (a user turn and
an assistant turn). Both are rendered by :mod:`deepseek.data.chat`, the template ``/v1/chat/completions`` uses, and
labelled with -100 everywhere except on what the model generates at serving time: each assistant turn's content
and the suffix that ends it (``<|end|>`` for tokenizers with role tokens).

:func:`pack` puts several examples into one row of ``seq_len`` tokens. The row comes with ``document_ids`` and
``positions`` for :class:`~deepseek.models.transformer.MoETransformer` (``model(ids, document_ids=...,
positions=...)``): each example attends only to itself and its rotary positions restart at 0, so its logits are
those it would get alone.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, TypeVar

import torch

from deepseek.data.chat import ROLES, chat_template

IGNORE_INDEX = -100
log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class SFTExample:
    """One encoded example: ``ids`` and ``labels`` of equal length (labels -100 where no loss is taken)."""

    ids: list[int]
    labels: list[int]
    source: str = ""  # ``path:line`` it came from


class BadRow(ValueError):
    """A row that cannot become an SFT example; the message says why (``read_sft_jsonl`` adds ``path:line``)."""


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def chat_turns(row: Any) -> list[tuple[str, str]]:
    """(role, content) turns of a JSONL row: ``messages``, or ``prompt``/``completion``. Raises :class:`BadRow`."""
    if not isinstance(row, dict):
        raise BadRow("row is not a JSON object")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise BadRow("'messages' must be a non-empty list")
        turns = []
        for i, m in enumerate(messages):
            role = m.get("role") if isinstance(m, dict) else None
            if not isinstance(role, str) or role not in ROLES:
                raise BadRow(f"messages[{i}] has no role system, user or assistant")
            content = m.get("content")
            if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                                 and isinstance(p.get("text"), str) for p in content):
                content = "".join(p["text"] for p in content)  # text parts, joined as serving joins them
            if not isinstance(content, str):
                raise BadRow(f"messages[{i}].content must be a string or a list of text parts")
            if role == "assistant" and not content.strip():
                raise BadRow(f"messages[{i}] is an empty assistant turn")
            turns.append((role, content))
    elif "prompt" in row or "completion" in row:
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise BadRow("'prompt' and 'completion' must both be strings")
        if not completion.strip():
            raise BadRow("empty completion")
        turns = [("user", prompt), ("assistant", completion)]
    else:
        raise BadRow("row has neither 'messages' nor 'prompt'/'completion'")
    if not any(role == "assistant" for role, _ in turns):
        raise BadRow("no assistant turn: nothing to learn")
    return turns


def encode_chat(tokenizer, messages: Sequence[Any], max_len: Optional[int] = None) -> tuple[list[int], list[int]]:
    """``(ids, labels)`` of a chat: ``messages`` are OpenAI-style dicts or (role, content) pairs.

    Labels are -100 except on each assistant turn's content and the end-of-turn text after it. Encoded piece by
    piece so a label boundary is a token boundary; with role tokens (which split the text anyway) the ids equal
    the encoding of the rendered text. Raises :class:`BadRow` for an invalid chat or one longer than ``max_len``.
    """
    turns = chat_turns({"messages": [m if isinstance(m, dict) else {"role": m[0], "content": m[1]}
                                     for m in messages]})
    return _encode_turns(tokenizer, turns, max_len)


def encode_prompt_completion(tokenizer, prompt: str, completion: str,
                             max_len: Optional[int] = None) -> tuple[list[int], list[int]]:
    """``(ids, labels)`` of a prompt/completion pair, rendered as a user turn and an assistant turn."""
    return _encode_turns(tokenizer, chat_turns({"prompt": prompt, "completion": completion}), max_len)


def _encode_turns(tokenizer, turns: list[tuple[str, str]], max_len: Optional[int]) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for text, generated in chat_template(tokenizer).segments(turns):
        piece = _encode(tokenizer, text)
        ids += piece
        labels += piece if generated else [IGNORE_INDEX] * len(piece)
    if max_len is not None and len(ids) > max_len:
        raise BadRow(f"{len(ids)} tokens, more than max_len={max_len}")
    return ids, labels


def read_sft_jsonl(path: str | Path, tokenizer, max_len: int, on_bad: str = "skip",
                   problems: Optional[list[str]] = None) -> list[SFTExample]:
    """The examples of an SFT JSONL file, every bad row reported as ``path:line: reason``.

    Bad rows: not JSON, missing or unknown roles, non-string content, an empty assistant turn, no assistant turn,
    more than ``max_len`` tokens. ``on_bad="skip"`` logs a warning for each (and appends it to ``problems`` if
    given) and goes on; ``on_bad="error"`` raises ValueError at the first. Blank lines are skipped silently.
    """
    return [SFTExample(ids, labels, where) for where, (ids, labels) in read_jsonl_rows(
        path, lambda row: _encode_turns(tokenizer, chat_turns(row), max_len), on_bad, problems)]


def read_jsonl_rows(path: str | Path, encode: Callable[[Any], T], on_bad: str = "skip",
                    problems: Optional[list[str]] = None) -> list[tuple[str, T]]:
    """``(path:line, encode(row))`` for every row of a JSONL file that ``encode`` accepts; ``encode`` refuses a row by
    raising :class:`BadRow`. ``on_bad="skip"`` logs each refusal as ``path:line: reason`` (and appends it to
    ``problems`` if given) and goes on; ``on_bad="error"`` raises ValueError at the first. Blank lines are skipped."""
    if on_bad not in ("skip", "error"):
        raise ValueError(f"on_bad must be 'skip' or 'error', got {on_bad!r}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise BadRow(f"not JSON ({exc.msg})") from None
                encoded = encode(row)
            except BadRow as exc:
                message = f"{where}: {exc}"
                if on_bad == "error":
                    raise ValueError(message) from None
                log.warning("skipped %s", message)
                if problems is not None:
                    problems.append(message)
                continue
            rows.append((where, encoded))
    return rows


@dataclass
class PackedBatch:
    """Packed rows, each [B, T]: token ids, labels (-100 on prompts and padding), rotary positions (0 at the start
    of every example), and document ids (the example's index in the row; padding -1)."""

    ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    document_ids: torch.Tensor


def pack_rows(examples: Iterable[SFTExample | tuple], seq_len: int) -> list[list[tuple[list[int], list[int]]]]:
    """Greedy first-fit: each example (in order) goes into the first row with room for it, else a new row.

    Returns the rows as lists of (ids, labels). An example longer than ``seq_len`` is a ValueError (the reader
    refuses them already, given ``max_len <= seq_len``).
    """
    rows: list[list[tuple[list[int], list[int]]]] = []
    room: list[int] = []
    for ex in examples:
        ids, labels = (ex.ids, ex.labels) if isinstance(ex, SFTExample) else ex
        if len(ids) > seq_len:
            raise ValueError(f"example of {len(ids)} tokens does not fit seq_len={seq_len}")
        for r, free in enumerate(room):
            if len(ids) <= free:
                rows[r].append((ids, labels))
                room[r] -= len(ids)
                break
        else:
            rows.append([(ids, labels)])
            room.append(seq_len - len(ids))
    return rows


def pack(examples: Iterable[SFTExample | tuple], seq_len: int, batch_size: int = 1,
         pad_id: int = 0) -> list[PackedBatch]:
    """Packed batches of ``batch_size`` rows of ``seq_len`` tokens (the last batch may have fewer rows).

    Padding at a row's end has label -100 and document id -1 (it attends only to padding, and is never scored).
    """
    batches = []
    rows = pack_rows(examples, seq_len)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids = torch.full((len(chunk), seq_len), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), seq_len), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(chunk), seq_len), dtype=torch.long)
        document_ids = torch.full((len(chunk), seq_len), -1, dtype=torch.long)
        for b, row in enumerate(chunk):
            at = 0
            for doc, (ex_ids, ex_labels) in enumerate(row):
                n = len(ex_ids)
                ids[b, at:at + n] = torch.tensor(ex_ids)
                labels[b, at:at + n] = torch.tensor(ex_labels)
                positions[b, at:at + n] = torch.arange(n)
                document_ids[b, at:at + n] = doc
                at += n
            positions[b, at:] = torch.arange(seq_len - at)
        batches.append(PackedBatch(ids, labels, positions, document_ids))
    return batches


def sft_targets(labels_BT: torch.Tensor, document_ids_BT: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Next-token targets for ``model(ids, targets=...)``: position t predicts label t+1 (the last one nothing).

    With ``document_ids`` no token predicts across a document boundary (an example's last token never learns the
    next example's first one; that one is a prompt token anyway, -100, but this does not rely on it).
    """
    targets_BT = torch.full_like(labels_BT, IGNORE_INDEX)
    targets_BT[:, :-1] = labels_BT[:, 1:]
    if document_ids_BT is not None:
        crossing_BT = document_ids_BT[:, 1:] != document_ids_BT[:, :-1]
        targets_BT[:, :-1] = targets_BT[:, :-1].masked_fill(crossing_BT, IGNORE_INDEX)
    return targets_BT
