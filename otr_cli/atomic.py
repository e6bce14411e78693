"""Atomic file writes: a reader sees the old file or the new one, never a torn or empty one.

One mechanism for every writer of results, summaries, run state and checkpoint metadata: write a
uniquely named temporary sibling, fsync it, rename it over the target, then fsync the directory so
the rename itself survives a power loss. Unique names let two writers of the same path (two ranks
marking a run failed, a sweep's points) race without one deleting or truncating the other's file:
the last rename wins whole.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable


def fsync_directory(directory: Path) -> None:
    """Make renames and creations inside `directory` durable (a no-op where directories cannot be opened)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some file systems (and Windows) refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(descriptor)


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Replace `path` with what `write(handle)` writes to a binary file handle, atomically; creates the parent
    directory if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) atomically; creates the parent directory if needed."""
    write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """`payload` as indented JSON, atomically."""
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict]) -> None:
    """One JSON object per line, atomically."""
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
