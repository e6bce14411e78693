"""Completions cached on disk by (model, prompt, generation settings), so an interrupted eval resumes.

The cache is a JSON-lines file appended after every batch: ``{"key": sha256, "completions": [...]}``.
A line cut short by a crash is ignored on reading (those prompts are simply generated again).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Optional


def model_fingerprint(model_path: str, revision: Optional[str] = None) -> str:
    """The model's identity: the path or hub id, plus the size and mtime of local weight files.

    A directory overwritten with new weights (a re-run into the same output_dir) gets a new
    fingerprint, so stale completions are never reused.
    """
    path = Path(model_path).expanduser()
    parts = [str(path.resolve()) if path.exists() else model_path, revision or ""]
    if path.is_dir():
        for weight in sorted(path.glob("*")):
            if weight.suffix in (".safetensors", ".bin", ".gguf", ".pt"):
                stat = weight.stat()
                parts.append(f"{weight.name}:{stat.st_size}:{stat.st_mtime_ns}")
    elif path.is_file():
        stat = path.stat()
        parts.append(f"{stat.st_size}:{stat.st_mtime_ns}")
    return "|".join(parts)


def cache_key(fingerprint: str, prompt: str, settings: dict) -> str:
    payload = json.dumps([fingerprint, prompt, settings], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class GenerationCache:
    """Append-only store: key -> list of completions. `path=None` keeps nothing (cache disabled).

    `read_also`: other cache files whose completions are reused (other ranks' caches of a sharded
    evaluation); only `path` is written.
    """

    def __init__(self, path: Optional[Path], read_also: Iterable[Path] = ()):
        self.path = path
        self.entries: dict[str, list[str]] = {}
        for source in dict.fromkeys([*read_also, *([path] if path is not None else [])]):
            if source.is_file():
                self._read(source)

    def _read(self, source: Path) -> None:
        with source.open(encoding="utf-8") as handle:
            for line in handle:
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = list(entry["completions"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by an interruption

    def get(self, key: str) -> Optional[list[str]]:
        return self.entries.get(key)

    def put_many(self, items: list[tuple[str, list[str]]]) -> None:
        """Record completions and make them durable before returning."""
        for key, completions in items:
            self.entries[key] = completions
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = self.path.is_file() and self.path.stat().st_size > 0 and not self.path.read_bytes().endswith(b"\n")
        with self.path.open("a", encoding="utf-8") as handle:
            if torn:
                handle.write("\n")  # end the line an interruption cut short, so ours parses
            for key, completions in items:
                handle.write(json.dumps({"key": key, "completions": completions}, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
