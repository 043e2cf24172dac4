"""Preference data for DPO: TRL's preference JSONL rendered by the serving chat template.

Legend: B pairs, T tokens.

Rows are TRL's conversational format ``{"prompt": [turns...], "chosen": [assistant turn], "rejected": [assistant
turn]}`` (what :mod:`deepseek.data.instructions` writes) or plain strings ``{"prompt": str, "chosen": str,
"rejected": str}`` (a user turn and an assistant turn each). Chosen and rejected are the prompt turns followed by
their assistant turn, encoded like SFT chats (:func:`deepseek.finetune.sft.encode_chat`); the completion mask is 1
exactly on the final assistant turn's tokens and its end marker.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from deepseek.finetune.sft import IGNORE_INDEX, BadRow, _encode_turns, chat_turns, read_jsonl_rows



@dataclass
class PreferencePair:
    """One encoded pair: ids and completion mask (1 on the assistant turn) of the chosen and the rejected chat."""

    chosen_ids: list[int]
    chosen_mask: list[int]
    rejected_ids: list[int]
    rejected_mask: list[int]
    source: str = ""  # ``path:line``


def _turns(value: Any, name: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user" if name == "prompt" else "assistant", "content": value}]
    if isinstance(value, list) and value:
        return value
    raise BadRow(f"'{name}' must be a string or a non-empty list of messages")


def preference_turns(row: Any) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(chosen turns, rejected turns) of a preference row. Raises :class:`BadRow`."""
    if not isinstance(row, dict):
        raise BadRow("row is not a JSON object")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
    if missing:
        raise BadRow(f"row has no {', '.join(repr(k) for k in missing)}")
    prompt = _turns(row["prompt"], "prompt")
    out = []
    for name in ("chosen", "rejected"):
        answer = _turns(row[name], name)
        if len(answer) != 1 or not isinstance(answer[0], dict) or answer[0].get("role") != "assistant":
            raise BadRow(f"'{name}' must be one assistant turn")
        turns = chat_turns({"messages": prompt + answer})
        if any(role == "assistant" for role, _ in turns[:-1]):
            raise BadRow("'prompt' holds an assistant turn; only the final turn is scored")
        out.append(turns)
    return out[0], out[1]


def encode_pair(tokenizer, row: Any, max_len: Optional[int] = None) -> tuple[list[int], list[int], list[int],
                                                                            list[int]]:
    """``(chosen_ids, chosen_mask, rejected_ids, rejected_mask)`` of a preference row. Raises :class:`BadRow`."""
    encoded = []
    for turns in preference_turns(row):
        ids, labels = _encode_turns(tokenizer, turns, max_len)
        encoded += [ids, [int(label != IGNORE_INDEX) for label in labels]]
    return tuple(encoded)  # type: ignore[return-value]


def read_preference_jsonl(path: str | Path, tokenizer, max_len: int, on_bad: str = "skip",
                          problems: Optional[list[str]] = None) -> list[PreferencePair]:
    """The pairs of a preference JSONL file, every bad row reported as ``path:line: reason`` (as
    :func:`~deepseek.finetune.sft.read_sft_jsonl`: ``skip`` warns and goes on, ``error`` raises ValueError)."""
    return [PreferencePair(*encoded, source=where) for where, encoded in read_jsonl_rows(
        path, lambda row: encode_pair(tokenizer, row, max_len), on_bad, problems)]


@dataclass
class PreferenceBatch:
    """Pairs, each [B, T] (right-padded with 0, mask 0 there): chosen and rejected ids and completion masks."""

    chosen_ids: torch.Tensor
    chosen_mask: torch.Tensor
    rejected_ids: torch.Tensor
    rejected_mask: torch.Tensor


def collate_pairs(pairs: list[PreferencePair], pad_id: int = 0) -> PreferenceBatch:
    """All ``pairs`` as one :class:`PreferenceBatch`, padded to the longest chat of either side."""
    length = max(max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    tensors = []
    for field in ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask"):
        out = torch.full((len(pairs), length), pad_id if field.endswith("ids") else 0, dtype=torch.long)
        for b, pair in enumerate(pairs):
            values = getattr(pair, field)
            out[b, :len(values)] = torch.tensor(values, dtype=torch.long)
        tensors.append(out)
    return PreferenceBatch(*tensors)


def trim_padding(batch: PreferenceBatch) -> PreferenceBatch:
    """``batch`` without its trailing columns that are padding in every row (one host read).

    A loader's batch is a slice of all pairs collated at once (:func:`collate_pairs`), so it is padded to the longest
    chat of the whole file; forwards over those columns are wasted work. The completion mask ends where each chat
    ends (the scored assistant turn is the last one), and right padding is invisible to the tokens before it under
    causal attention, so the log-probabilities are unchanged.
    """
    used_T = (batch.chosen_mask.any(dim=0) | batch.rejected_mask.any(dim=0)).nonzero()
    length = int(used_T.max()) + 1 if used_T.numel() else batch.chosen_ids.shape[1]
    if length == batch.chosen_ids.shape[1]:
        return batch
    return PreferenceBatch(*(t[:, :length] for t in (batch.chosen_ids, batch.chosen_mask, batch.rejected_ids,
                                                        batch.rejected_mask)))
