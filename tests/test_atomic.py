"""One atomic writer for results, summaries, run state and checkpoint metadata (otr_cli/atomic.py)."""

from __future__ import annotations

import json
import os
import threading

import pytest

from otr_cli import atomic
from otr_cli.atomic import write_json_atomic, write_jsonl_atomic, write_text_atomic


def test_write_replaces_the_file_and_leaves_no_temporary_behind(tmp_path):
    target = tmp_path / "sub" / "results.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["results.json"]


def test_jsonl_rows_one_per_line(tmp_path):
    target = tmp_path / "rows.jsonl"
    write_jsonl_atomic(target, [{"x": "é"}, {"x": 2}])
    assert [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()] == [{"x": "é"}, {"x": 2}]


def test_a_failed_write_keeps_the_old_file_whole_and_removes_its_temporary(tmp_path, monkeypatch):
    target = tmp_path / "run_state.json"
    write_json_atomic(target, {"status": "running"})

    def crash(*args, **kwargs):
        raise OSError("No space left on device (simulated)")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        write_json_atomic(target, {"status": "finished"})
    assert json.loads(target.read_text()) == {"status": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["run_state.json"]


def test_the_file_and_its_directory_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        kind = "dir" if os.path.isdir(f"/proc/self/fd/{descriptor}") else "file"
        events.append(f"fsync {kind}")
        real_fsync(descriptor)

    def replace(source, target):
        events.append("rename")
        real_replace(source, target)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    write_text_atomic(tmp_path / "summary.json", "{}")
    assert events == ["fsync file", "rename", "fsync dir"]


def test_concurrent_writers_of_one_path_never_collide_or_leave_a_torn_file(tmp_path):
    # The old checkpoint writer used one fixed temporary name: two writers truncated each other's file.
    target = tmp_path / "state.json"
    errors = []

    def writer(index: int) -> None:
        try:
            for round_ in range(30):
                write_json_atomic(target, {"writer": index, "round": round_, "pad": "x" * 20000})
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert json.loads(target.read_text())["round"] == 29
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
