"""A first tokenization shared by the ranks (issue 25, item 1): every rank encodes a share in short rounds,
the result equals one process's, chunks survive a kill, a cache hit reads records on rank 0 only, and a data
set that takes longer to tokenize than launcher.dist_timeout_min still starts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from helpers import tiny_overrides
from otr_cli.config import DataConfig
from otr_cli.data import build_datasets, pipeline, shared_encoding
from ranks import start_ranks, wait_all

WORKER = str(Path(__file__).with_name("data_rank_worker.py"))


def _qa_file(path: Path, count: int, bad_line: int | None = None) -> Path:
    lines = [json.dumps({"question": f"What is {i} + {i}?", "answer": f"The answer is {2 * i}."}) for i in range(count)]
    if bad_line is not None:
        lines[bad_line - 1] = json.dumps({"question": "no answer field"})
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(tmp_path: Path, data: dict, world: int, name: str = "run", timeout: float = 240, **settings) -> list[dict]:
    out = tmp_path / name
    out.mkdir()
    (out / "settings.json").write_text(json.dumps({"data": data, **settings}))
    processes = start_ranks([str(out / "settings.json"), str(out)], out, world=world, script=WORKER)
    codes = wait_all(processes, timeout)
    for process in processes:
        if process.poll() is None:
            process.kill()
    logs = "\n".join((out / f"rank{r}.log").read_text() for r in range(world))
    assert all(code is not None for code in codes), f"ranks still running after {timeout} s:\n{logs[-4000:]}"
    results = [json.loads((out / f"rank{r}.json").read_text()) if (out / f"rank{r}.json").exists() else
               {"exit": codes[r]} for r in range(world)]
    return results


def _digest(bundle) -> str:
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for array in bundle.train.arrays().values():
        digest.update(array.tobytes())
    return digest.hexdigest()


@pytest.mark.slow
def test_every_rank_tokenizes_a_share_and_the_result_equals_one_process(tokenizer, tmp_path, monkeypatch):
    source = _qa_file(tmp_path / "qa.jsonl", 60)
    # 13 of 57 examples: the limit falls inside a chunk, so the merge must stop where one process stops
    data = {"source": str(source), "cache_dir": str(tmp_path / "cache"), "validation_size": 3, "max_length": 64,
            "max_examples": 13}
    monkeypatch.setattr(shared_encoding, "CHUNK_RECORDS", 4)
    one = build_datasets(DataConfig(**{**data, "cache": False}), tokenizer, seed=1)

    results = _run(tmp_path, data, world=3, chunk_records=4)
    assert [r.get("cache") for r in results] == ["miss"] * 3, results
    assert {r["train_digest"] for r in results} == {_digest(one)}
    assert all(r["report"] | {"cache": "", "cache_path": ""} == one.report.as_dict() | {"cache": "", "cache_path": ""}
               for r in results)
    # 13 examples need 4 chunks of 4 (rounds of 3 ranks: 6 chunks) and the limit's chunk again; 3 validation
    assert all(r["encodes"] > 0 for r in results), "every rank encodes a share"
    assert sum(r["encodes"] for r in results) < 40, "the rounds stop once the chunks hold data.max_examples"

    again = _run(tmp_path, data, world=3, name="again", chunk_records=4)
    assert [r["cache"] for r in again] == ["hit"] * 3 and {r["train_digest"] for r in again} == {_digest(one)}
    assert [r["encodes"] for r in again] == [0, 0, 0]
    assert [r["reads"] > 0 for r in again] == [True, False, False], "only rank 0 reads and hashes the records"


@pytest.mark.slow
def test_every_rank_builds_the_same_mixture_as_one_process(tokenizer, tmp_path, monkeypatch):
    first, second = _qa_file(tmp_path / "a.jsonl", 30), tmp_path / "b.jsonl"
    second.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(20)))
    data = {"cache_dir": str(tmp_path / "cache"), "max_length": 64, "validation_size": 4,
            "sources": [{"source": str(first), "weight": 2.0}, {"source": str(second), "examples": 25}]}
    monkeypatch.setattr(shared_encoding, "CHUNK_RECORDS", 4)
    one = build_datasets(DataConfig(**{**data, "cache": False}), tokenizer, seed=1)
    results = _run(tmp_path, data, world=2, chunk_records=4)
    assert [r.get("cache") for r in results] == ["miss"] * 2, results
    assert {r["train_digest"] for r in results} == {_digest(one)}
    assert all(r["report"]["sources"] == one.report.sources for r in results)


@pytest.mark.faults
@pytest.mark.slow
def test_a_bad_record_in_another_ranks_share_stops_every_rank_with_its_location(tmp_path):
    source = _qa_file(tmp_path / "bad.jsonl", 24, bad_line=15)  # chunk 3 of 4-record chunks: rank 1's (round 2)
    data = {"source": str(source), "cache_dir": str(tmp_path / "cache"), "max_length": 64, "shuffle": False}
    results = _run(tmp_path, data, world=2, chunk_records=4)
    assert "bad.jsonl:15" in results[1]["error"], results
    assert "rank 1" in results[0]["error"] and "bad.jsonl" not in results[0]["error"], results


@pytest.mark.faults
def test_chunks_finished_before_a_kill_are_not_tokenized_again(tokenizer, tmp_path, monkeypatch):
    source = _qa_file(tmp_path / "qa.jsonl", 20)
    cfg = DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), max_length=64)
    monkeypatch.setattr(shared_encoding, "CHUNK_RECORDS", 4)
    calls = {"n": 0}
    original = pipeline.encode_conversation

    class Killed(BaseException):
        """Stands for SIGKILL: nothing after it runs, no handler catches it."""

    def dies_on_the_eleventh(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 11:
            raise Killed
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "encode_conversation", dies_on_the_eleventh)
    with pytest.raises(Killed):
        build_datasets(cfg, tokenizer, seed=1)
    [progress] = [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".partial")]
    assert len(list(progress.glob("train.*.npz"))) == 2, "chunks 0 and 1 (records 1-8) were stored"

    calls["n"] = 100  # past the kill
    resumed = build_datasets(cfg, tokenizer, seed=1)
    assert calls["n"] - 100 == 20 - 8, "only the records of the chunks not stored are tokenized"
    monkeypatch.setattr(pipeline, "encode_conversation", original)
    assert resumed.train == build_datasets(DataConfig(source=str(source), cache=False, max_length=64),
                                           tokenizer, seed=1).train
    assert not progress.exists(), "the chunks go once the entry is stored"


def test_an_unreadable_stored_chunk_is_tokenized_again(tokenizer, tmp_path, monkeypatch, caplog):
    source = _qa_file(tmp_path / "qa.jsonl", 12)
    cfg = DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), max_length=64)
    monkeypatch.setattr(shared_encoding, "CHUNK_RECORDS", 4)
    reference = build_datasets(DataConfig(source=str(source), cache=False, max_length=64), tokenizer, seed=1)
    entry_dir = tmp_path / "cache"
    key = Path(build_datasets(cfg, tokenizer, seed=1).report.cache_path).name
    # What a crash mid-write would leave if the rename were not atomic: a truncated chunk under the final name.
    for child in entry_dir.iterdir():
        if not child.name.startswith("."):
            import shutil
            shutil.rmtree(child)
    progress = entry_dir / f".{key}.partial"
    progress.mkdir()
    (progress / shared_encoding.chunk_path(progress, "train", 1).name).write_bytes(b"PK\x03\x04 truncated")
    with caplog.at_level(logging.WARNING):
        rebuilt = build_datasets(cfg, tokenizer, seed=1)
    assert "unreadable" in caplog.text and rebuilt.train == reference.train


@pytest.mark.faults
@pytest.mark.slow
def test_a_first_tokenization_longer_than_the_collective_timeout_starts_training(tiny_model_dir, tmp_path):
    """Reproduced before the fix (this test on the old code): rank 1 waited in a barrier while rank 0 tokenized
    alone, timed out ("Timed out waiting ... for recv operation"), and no cache entry was stored."""
    source = _qa_file(tmp_path / "qa.jsonl", 40000)  # about 20 s of tokenizing for one process here
    overrides = [o for o in tiny_overrides(tiny_model_dir, tmp_path / "run", "trainer.max_steps=1",
                                           "launcher.dist_timeout_min=0.1", f"data.cache_dir={tmp_path / 'cache'}",
                                           f"data.source={source}", "data.validation_size=8")
                 if not o.startswith("data.synthetic")]
    processes = start_ranks(["train", *overrides], tmp_path, world=2)
    codes = wait_all(processes, 400)
    for process in processes:
        if process.poll() is None:
            process.kill()
    logs = "\n".join((tmp_path / f"rank{r}.log").read_text() for r in range(2))
    assert codes == [0, 0], logs[-6000:]
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file()
