"""Turning a growing list of token ids into text deltas, and finding stop strings in them.

Byte-level tokens can split a UTF-8 character, so text is only released once the decoded suffix no
longer ends in the replacement character; decoding restarts from a recent offset, not from the
beginning, so the cost per token stays constant (the approach of TGI and vLLM).
"""

from __future__ import annotations

from typing import Sequence

from tokenizers import Tokenizer


class IncrementalDetokenizer:
    """Push token ids one at a time; get back the new text each one completes."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self._prefix_offset:self._read_offset])
        full = self.tokenizer.decode(self.ids[self._prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix = self.tokenizer.decode(self.ids[self._prefix_offset:self._read_offset])
        full = self.tokenizer.decode(self.ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self.ids)
        return full[len(prefix):]


class StopStringMatcher:
    """Accumulates text, cuts it at the first stop string, and holds back a possible partial match.

    ``feed(delta)`` returns the text that is safe to emit now and whether a stop string was found.
    Text that could be the beginning of a stop string is held until it is decided.
    """

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.text = ""  # everything emitted or held
        self.emitted = 0
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        search_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += delta
        cut = min((i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self.stopped = True
            return self._release(len(self.text)), True
        return self._release(len(self.text) - self._partial_match_length()), False

    def finish(self) -> str:
        """The held-back text, released when generation ends for another reason."""
        return self._release(len(self.text))

    def _partial_match_length(self) -> int:
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _release(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out = self.text[self.emitted:upto]
        self.emitted = upto
        return out
