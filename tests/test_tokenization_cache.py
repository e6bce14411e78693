"""The tokenized-data cache (issue 16): hit on the second build, missed when anything it depends on changes,
off when asked, rebuilt when broken, and one tokenization for every rank of a multi-rank start."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path

import pytest

from helpers import read_jsonl, tiny_overrides
from otr_cli.config import DataConfig
from otr_cli.data import build_datasets, pipeline
from otr_cli.data.cache import META_FILE, REPORT_LOOKUP_FIELDS

EXAMPLES_FILE = "train.input_ids.npy"  # the largest array of an entry


def _qa_file(path: Path, count: int = 12, answer: str = "The answer is") -> Path:
    path.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"{answer} {2 * i}."}) + "\n"
                            for i in range(count)))
    return path


@pytest.fixture
def data_file(tmp_path) -> Path:
    return _qa_file(tmp_path / "qa.jsonl")


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def encodes(monkeypatch) -> dict:
    """Counts calls of the encoding function (one per record tokenized)."""
    counter = {"n": 0}
    original = pipeline.encode_conversation

    def counting(*args, **kwargs):
        counter["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "encode_conversation", counting)
    return counter


def _cfg(data_file: Path, cache_dir: Path, **overrides) -> DataConfig:
    settings = {"source": str(data_file), "cache_dir": str(cache_dir), "validation_size": 3, "max_length": 64}
    return DataConfig(**{**settings, **overrides})


def _entries(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.iterdir() if not p.name.startswith(".")) if cache_dir.exists() else []


def _data_report(report) -> dict:
    """The report without the fields that describe the cache lookup itself."""
    return {k: v for k, v in dataclasses.asdict(report).items() if k not in REPORT_LOOKUP_FIELDS}


def test_second_build_is_a_cache_hit_that_tokenizes_nothing_and_returns_the_same_bundle(
        tokenizer, data_file, cache_dir, encodes, caplog):
    cfg = _cfg(data_file, cache_dir)
    first = build_datasets(cfg, tokenizer, seed=1)
    assert encodes["n"] == 12 and first.report.cache == "miss"
    [entry] = _entries(cache_dir)
    assert first.report.cache_path == str(entry)
    assert {p.name for p in entry.iterdir()} == {META_FILE} | {
        f"{split}.{array}.npy" for split in ("train", "validation")
        for array in ("input_ids", "supervised", "offsets", "num_supervised")}
    assert not any(p.name.endswith(".partial") for p in cache_dir.iterdir()), "the chunks go once the entry is stored"

    with caplog.at_level(logging.INFO, logger="otr_cli.data.pipeline"):
        second = build_datasets(cfg, tokenizer, seed=1)
    assert encodes["n"] == 12, "a cache hit must not tokenize again"
    assert (second.report.cache, second.report.cache_path) == ("hit", str(entry))
    assert f"data: tokenized cache hit {entry}" in caplog.text
    assert second.train == first.train and second.validation == first.validation
    assert _data_report(second.report) == _data_report(first.report)
    assert len(second.validation) == 3 and all(type(t) is int for t in second.train[0].input_ids)


def test_weights_and_an_empty_validation_set_survive_the_round_trip(tokenizer, tmp_path, cache_dir, encodes):
    path = tmp_path / "w.jsonl"
    path.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": f"A {i}.", "w": [0.5, 1, 2][i % 3]}) + "\n"
                            for i in range(6)))
    cfg = DataConfig(source=str(path), cache_dir=str(cache_dir), weight_field="w", max_length=64)
    first = build_datasets(cfg, tokenizer, seed=0)
    second = build_datasets(cfg, tokenizer, seed=0)
    assert encodes["n"] == 6 and second.report.cache == "hit"
    assert any(example.weights for example in first.train) and any(example.weights is None for example in first.train)
    assert second.train == first.train and second.validation == first.validation == []


@pytest.mark.parametrize("change", ["max_length", "seed", "chat_template setting", "file content"])
def test_a_change_of_what_the_data_depends_on_misses(tokenizer, data_file, cache_dir, encodes, change):
    cfg, seed = _cfg(data_file, cache_dir), 1
    build_datasets(cfg, tokenizer, seed=seed)
    if change == "max_length":
        cfg = _cfg(data_file, cache_dir, max_length=128)
    elif change == "seed":
        seed = 2
    elif change == "chat_template setting":
        cfg = _cfg(data_file, cache_dir, chat_template="chatml")
    else:  # same file, same size, one character changed
        _qa_file(data_file, answer="The answer IS")
    again = build_datasets(cfg, tokenizer, seed=seed)
    assert again.report.cache == "miss" and encodes["n"] == 24
    assert len(_entries(cache_dir)) == 2


def test_touching_the_file_without_changing_it_still_hits(tokenizer, data_file, cache_dir, encodes):
    build_datasets(_cfg(data_file, cache_dir), tokenizer, seed=1)
    data_file.write_text(data_file.read_text())  # new mtime, same records
    assert build_datasets(_cfg(data_file, cache_dir), tokenizer, seed=1).report.cache == "hit"


def test_batching_settings_reuse_the_same_entry(tokenizer, data_file, cache_dir, encodes):
    build_datasets(_cfg(data_file, cache_dir), tokenizer, seed=1)
    packed = _cfg(data_file, cache_dir, packing=True, pack_length=1024, group_by_length=True)
    assert build_datasets(packed, tokenizer, seed=1).report.cache == "hit" and encodes["n"] == 12


def test_a_changed_tokenizer_misses(tokenizer, data_file, cache_dir, encodes):
    cfg = _cfg(data_file, cache_dir)
    build_datasets(cfg, tokenizer, seed=1)

    other_template = copy.deepcopy(tokenizer)  # the session's tokenizer stays as it is
    other_template.chat_template = tokenizer.chat_template.replace("You are a helpful AI assistant",
                                                                   "You are a terse AI assistant")
    assert build_datasets(cfg, other_template, seed=1).report.cache == "miss"

    extra_token = copy.deepcopy(tokenizer)
    extra_token.add_tokens(["<|scratchpad|>"])  # the serialized backend changes, the template does not
    assert build_datasets(cfg, extra_token, seed=1).report.cache == "miss"
    assert encodes["n"] == 36 and len(_entries(cache_dir)) == 3


def test_cache_false_tokenizes_every_time_and_writes_nothing(tokenizer, data_file, cache_dir, encodes):
    cfg = _cfg(data_file, cache_dir, cache=False)
    for _ in range(2):
        assert build_datasets(cfg, tokenizer, seed=1).report.cache == "off"
    assert encodes["n"] == 24 and not cache_dir.exists()


@pytest.mark.parametrize("damage", ["truncated examples", "garbage meta", "missing examples"])
def test_a_broken_entry_is_rebuilt_with_a_warning(tokenizer, data_file, cache_dir, encodes, caplog, damage):
    cfg = _cfg(data_file, cache_dir)
    first = build_datasets(cfg, tokenizer, seed=1)
    entry = Path(first.report.cache_path)
    expected = list(first.train)  # read before the damage: `first` maps the files it damages
    examples = entry / EXAMPLES_FILE
    if damage == "truncated examples":
        examples.write_bytes(examples.read_bytes()[: examples.stat().st_size // 2])
    elif damage == "garbage meta":
        (entry / META_FILE).write_text("{not json")
    else:
        examples.unlink()
    with caplog.at_level(logging.WARNING):
        rebuilt = build_datasets(cfg, tokenizer, seed=1)
    assert "unreadable" in caplog.text and str(entry) in caplog.text
    assert rebuilt.report.cache == "miss" and rebuilt.train == expected and encodes["n"] == 24
    assert build_datasets(cfg, tokenizer, seed=1).report.cache == "hit"  # the rebuilt entry is good


@pytest.mark.faults
def test_a_killed_writers_leftovers_are_not_an_entry(tokenizer, data_file, cache_dir, encodes):
    cfg = _cfg(data_file, cache_dir)
    first = build_datasets(cfg, tokenizer, seed=1)
    entry = Path(first.report.cache_path)
    # What a writer killed before its rename leaves: a dot-named temporary sibling, never the entry itself.
    entry.rename(cache_dir / f".{entry.name}.12345.tmp")
    assert build_datasets(cfg, tokenizer, seed=1).report.cache == "miss" and encodes["n"] == 24


def test_an_unwritable_cache_dir_only_warns(tokenizer, data_file, tmp_path, encodes, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING):
        bundle = build_datasets(_cfg(data_file, blocker / "cache"), tokenizer, seed=1)
    assert (bundle.report.cache, bundle.report.cache_path) == ("miss", "")
    assert "could not write the tokenized cache" in caplog.text and len(bundle.train) == 9


def test_cache_dir_defaults_to_the_environment_variable(tokenizer, data_file, tmp_path, monkeypatch, encodes):
    monkeypatch.setenv("OTR_CACHE_DIR", str(tmp_path / "from-env"))
    bundle = build_datasets(DataConfig(source=str(data_file), max_length=64), tokenizer, seed=1)
    assert Path(bundle.report.cache_path).parent == tmp_path / "from-env"


@pytest.mark.slow
def test_two_cli_runs_miss_then_hit_and_train_the_same(tiny_model_dir, tmp_path):
    from otr_cli.cli import main

    cache = tmp_path / "cache"
    reports, losses = [], []
    for name in ("first", "second"):
        out = tmp_path / name
        main(["train", *tiny_overrides(tiny_model_dir, out, f"data.cache_dir={cache}", "trainer.max_steps=1")])
        reports.append(json.loads((out / "data_report.json").read_text()))
        losses.append([r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r])
    assert [r["cache"] for r in reports] == ["miss", "hit"]
    assert reports[0]["cache_path"] == reports[1]["cache_path"] and len(_entries(cache)) == 1
    assert losses[0] == losses[1]


def test_a_cache_hit_gives_the_data_fingerprint_without_reading_the_training_tokens(
        tokenizer, data_file, cache_dir, monkeypatch):
    """Rank 0 hashed every training token at each start, the other ranks waiting; the entry now keeps the digest."""
    from otr_cli.data.tokenized import TokenizedSplit
    from otr_cli.train.data_identity import train_data_fingerprint

    cfg = _cfg(data_file, cache_dir)
    first = build_datasets(cfg, tokenizer, seed=1)
    computed = train_data_fingerprint(first.train, cfg)
    [entry] = _entries(cache_dir)
    stored = json.loads((entry / META_FILE).read_text())["digests"]["train"]
    assert stored == computed["train_tokens"]

    def no_reading(self):
        raise AssertionError("the training split was hashed again")

    monkeypatch.setattr(TokenizedSplit, "content_digest", no_reading)
    hit = build_datasets(cfg, tokenizer, seed=1)
    assert hit.report.cache == "hit" and train_data_fingerprint(hit.train, cfg) == computed
    monkeypatch.undo()
    assert hit.train.content_digest() == stored  # the memory-mapped arrays hash as the ones built in memory


def test_an_entry_stored_without_a_digest_still_gives_the_same_fingerprint(tokenizer, data_file, cache_dir):
    from otr_cli.train.data_identity import train_data_fingerprint

    cfg = _cfg(data_file, cache_dir)
    expected = train_data_fingerprint(build_datasets(cfg, tokenizer, seed=1).train, cfg)
    [entry] = _entries(cache_dir)
    meta = json.loads((entry / META_FILE).read_text())
    del meta["digests"]  # as entries were stored before
    (entry / META_FILE).write_text(json.dumps(meta))
    hit = build_datasets(cfg, tokenizer, seed=1)
    assert hit.report.cache == "hit" and hit.train.stored_digest is None
    assert train_data_fingerprint(hit.train, cfg) == expected
