"""Reading the server's access log (``ds serve --access-log``): JSON lines, parsed one at a time, bad lines counted.

    for path, lineno, line in read_lines(["access.jsonl", "old.jsonl.gz"]): ...   # raw bytes, streamed
    record_or_reason = parse_line(line)          # a dict, or a str saying why the line is not a record
    tail = LogTail("access.jsonl"); tail.read_new()   # --follow: the complete lines appended since the last call

A record needs ``time`` (epoch seconds) and ``total_ms`` (a number >= 0); every other field is optional (see
docs/serving.md for what each route writes). The parse is orjson's: ~5x json.loads on these short lines.
"""

from __future__ import annotations

import datetime as dt
import gzip
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import orjson

from deepseek.errors import UserFacingError

Record = dict
FIRST_BAD_SHOWN = 5
_NUMBER = (int, float)


class LogReadError(UserFacingError):
    """An access log that cannot be read (missing, a directory, no permission) or an option that makes no sense."""


def parse_line(line: bytes) -> Union[Record, str]:
    """The record on ``line``, or why it is not one (a short reason)."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return "not JSON"
    if type(record) is not dict:
        return "not a JSON object"
    t = record.get("time")
    total = record.get("total_ms")
    if t is None or total is None:
        return "no 'time'" if t is None else "no 'total_ms'"
    if type(t) not in _NUMBER or type(total) not in _NUMBER:
        return "'time' is not a number" if type(t) not in _NUMBER else "'total_ms' is not a number"
    if not total >= 0 or total == math.inf:  # also NaN
        return "'total_ms' is negative or not finite"
    return record


def is_error(status) -> bool:
    """HTTP 4xx/5xx, or a gRPC status other than OK; a line without a status counts as a success."""
    if status is None:
        return False
    if type(status) is int:
        return status >= 400
    return status != "OK"


@dataclass
class BadLines:
    """The lines that were not records: how many, and the first few with where they are."""

    count: int = 0
    first: list[dict] = field(default_factory=list)

    def add(self, path: str, lineno: int, reason: str, line: bytes) -> None:
        self.count += 1
        if len(self.first) < FIRST_BAD_SHOWN:
            text = line.decode("utf-8", "replace").rstrip("\n")
            self.first.append({"path": path, "line": lineno, "reason": reason,
                               "text": text if len(text) <= 120 else text[:117] + "..."})


def open_log(path: str | Path):
    """``path`` opened for binary reading (gzip when it ends in .gz); a one-line error when it cannot be."""
    path = Path(path)
    try:
        if path.is_dir():
            raise LogReadError(f"access log {path} is a directory, not a file")
        return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    except FileNotFoundError:
        raise LogReadError(f"access log {path} does not exist") from None
    except PermissionError:
        raise LogReadError(f"access log {path} cannot be read (permission denied)") from None


def read_lines(paths: Iterable[str | Path]) -> Iterator[tuple[str, int, bytes]]:
    """``(path, line number from 1, raw line)`` for every non-blank line of every file, in order, streamed."""
    paths = list(paths)
    for path in paths:  # check them all first: a typo in the third file should not cost the first two's reading
        open_log(path).close()
    for path in paths:
        with open_log(path) as f:
            try:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        yield str(path), lineno, line
            except (OSError, EOFError) as exc:  # a truncated .gz: what was read stands
                raise LogReadError(f"access log {path}: {exc} (after line {lineno})") from None


class LogTail:
    """The lines appended to a growing file since the last :meth:`read_new` (``--follow``).

    A last line without its newline yet is held back until it is complete; a file that shrank (rotated or
    truncated) is read again from its start."""

    def __init__(self, path: str | Path, from_start: bool = True):
        self.path = Path(path)
        open_log(self.path).close()
        self.offset = 0 if from_start else self.path.stat().st_size
        self.partial = b""
        self.lineno = 0

    def read_new(self) -> list[tuple[str, int, bytes]]:
        size = self.path.stat().st_size
        if size < self.offset:  # truncated or replaced: start over
            self.offset, self.partial, self.lineno = 0, b"", 0
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        data = self.partial + data
        cut = data.rfind(b"\n") + 1
        self.partial = data[cut:]
        lines = []
        for line in data[:cut].splitlines(keepends=True):
            self.lineno += 1
            if line.strip():
                lines.append((str(self.path), self.lineno, line))
        return lines


# -- times and windows on the command line -----------------------------------------------------------------------

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNIT_S = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_CLOCK = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2}))?$")


def parse_duration(text: str) -> float:
    """``30s``, ``1m``, ``5m``, ``1h``, ``1d`` in seconds."""
    match = _DURATION.match(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise LogReadError(f"bad duration {text!r}: write a positive number and a unit, e.g. 30s, 1m, 1h")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def parse_instant(text: str) -> float:
    """Epoch seconds, or an ISO 8601 date-time (no zone = UTC), as epoch seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise LogReadError(f"bad time {text!r}: write epoch seconds or an ISO date-time such as "
                           "2026-12-07T12:00:00 (UTC unless it names a zone)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment.timestamp()


def parse_clock(text: str) -> Optional[float]:
    """``HH:MM[:SS]`` as seconds since midnight (UTC), or None when ``text`` is not a time of day."""
    match = _CLOCK.match(text.strip())
    if not match:
        return None
    h, m, s = int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)
    if h > 24 or m > 59 or s > 59:
        raise LogReadError(f"bad time of day {text!r}")
    return h * 3600.0 + m * 60 + s


def utc(t: float) -> str:
    """Epoch seconds as ``YYYY-MM-DD HH:MM:SS`` UTC."""
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
