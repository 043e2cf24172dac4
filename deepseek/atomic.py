"""Atomic writes of files and folders: a crash leaves the old version or the new one, never a mix.

Everything is written to a temporary sibling, fsynced, and renamed into place. Every stage that writes
(model directories, checkpoints, prepared data, run records) goes through here.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_into_place(tmp: Path, path: Path) -> None:
    """fsync every file and folder under ``tmp``, then rename it to ``path`` (replacing what was there)."""
    for file in tmp.rglob("*"):
        if file.is_file():
            fsync_file(file)
    for folder in (tmp, *(d for d in tmp.rglob("*") if d.is_dir())):
        fsync_dir(folder)
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        path.rename(old)
    tmp.rename(path)
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old)


def write_atomically(path: str | Path, write_into: Callable[[Path], Any]) -> Path:
    """Call ``write_into(tmp_dir)``, fsync what it wrote, then swap ``tmp_dir`` into ``path`` (a folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_into(tmp)
        swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_file_atomically(path: str | Path, data: str | bytes) -> Path:
    """Write one file through a fsynced temporary sibling and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomically(path: str | Path, data: Any) -> Path:
    """``data`` as indented JSON, written atomically."""
    return write_file_atomically(path, json.dumps(data, indent=2, default=str) + "\n")
