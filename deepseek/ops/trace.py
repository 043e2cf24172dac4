"""Chrome/Perfetto traces: the profiler writes one per schedule cycle; a profile keeps them as one file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from deepseek.atomic import write_file_atomically


def merge_chrome_traces(paths: Iterable[Path], out: Path) -> Path:
    """Write the ``traceEvents`` of every trace in ``paths`` (in order) into one trace at ``out`` (atomically);
    the other top-level fields (``displayTimeUnit``, ``deviceProperties``, …) are the first trace's."""
    merged: dict = {}
    events: list = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        events.extend(data.get("traceEvents", []))
        if not merged:
            merged = {k: v for k, v in data.items() if k != "traceEvents"}
    merged["traceEvents"] = events
    return write_file_atomically(out, json.dumps(merged))
