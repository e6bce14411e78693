"""data.sources: a mixture's per-source counts, determinism, report, cache key, resume check and entry errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from otr_cli.config import ConfigError, DataConfig, SourceConfig, TrainConfig, validate
from otr_cli.data import DataError, build_datasets

RECORDS_PER_SOURCE = 300


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(scope="module")
def three_sources(tmp_path_factory) -> list[str]:
    """Three sources of three formats, each record marked with its source (alpha, beta, gamma)."""
    folder = tmp_path_factory.mktemp("mixture")
    alpaca = _jsonl(folder / "alpaca.jsonl", [{"instruction": f"Count {i}", "input": "", "output": f"alpha {i}"}
                                              for i in range(RECORDS_PER_SOURCE)])
    text = _jsonl(folder / "text.jsonl", [{"text": f"beta {i}"} for i in range(RECORDS_PER_SOURCE)])
    qa = _jsonl(folder / "qa.jsonl", [{"question": f"Q {i}", "answer": f"gamma {i}"} for i in range(RECORDS_PER_SOURCE)])
    return [str(alpaca), str(text), str(qa)]


def _marks(bundle, tokenizer) -> list[str]:
    """The source mark of every training example, in training order."""
    marks = []
    for index in range(len(bundle.train)):
        text = tokenizer.decode(bundle.train[index].input_ids)
        marks.append(next(mark for mark in ("alpha", "beta", "gamma") if mark in text))
    return marks


def test_mixture_counts_match_the_weights_within_sampling_error(tokenizer, three_sources):
    weights = [1.0, 2.0, 3.0]
    cfg = DataConfig(cache=False, sources=[SourceConfig(source=path, weight=weight)
                                           for path, weight in zip(three_sources, weights)])
    bundle = build_datasets(cfg, tokenizer, seed=7)
    marks = _marks(bundle, tokenizer)
    draws = 3 * RECORDS_PER_SOURCE  # the weighted sources' records together
    assert len(marks) == draws
    for mark, weight in zip(("alpha", "beta", "gamma"), weights):
        share = weight / sum(weights)
        # Each draw picks a source independently, so a source's count is Binomial(draws, share); 4 standard
        # deviations (sqrt(draws * share * (1 - share)), 9.1 to 15.0 examples here) miss a correct mixture
        # with probability 6e-5 per source, and the seeded draw makes the test deterministic besides.
        tolerance = 4 * math.sqrt(draws * share * (1 - share))
        assert abs(marks.count(mark) - draws * share) <= tolerance, (mark, marks.count(mark))
    assert [part["format"] for part in bundle.report.sources] == ["alpaca", "text", "question_answer"]
    assert [part["kept"] for part in bundle.report.sources] == [marks.count(m) for m in ("alpha", "beta", "gamma")]
    assert bundle.report.format == "alpaca, text, question_answer"


def test_mixture_source_with_a_number_of_examples_gives_exactly_that_many(tokenizer, three_sources):
    cfg = DataConfig(cache=False, sources=[SourceConfig(source=three_sources[0], examples=10),
                                           SourceConfig(source=three_sources[1], examples=RECORDS_PER_SOURCE + 5),
                                           SourceConfig(source=three_sources[2], weight=1.0)])
    bundle = build_datasets(cfg, tokenizer, seed=0)
    marks = _marks(bundle, tokenizer)
    assert (marks.count("alpha"), marks.count("beta"), marks.count("gamma")) == (10, RECORDS_PER_SOURCE + 5,
                                                                                 RECORDS_PER_SOURCE)
    # More examples than records: every record once, then 5 of a second pass.
    betas = [tokenizer.decode(bundle.train[i].input_ids) for i, mark in enumerate(marks) if mark == "beta"]
    assert len(set(betas)) == RECORDS_PER_SOURCE


def test_mixture_per_source_counts_are_in_the_report_and_its_lines(tokenizer, three_sources):
    cfg = DataConfig(cache=False, validation_size=6, sources=[
        SourceConfig(source=three_sources[0], weight=2.0), SourceConfig(source=three_sources[1], examples=20)])
    report = build_datasets(cfg, tokenizer, seed=0).report
    first, second = report.sources
    assert first["source"] == f"{three_sources[0]} (weight 2)" and first["records"] == RECORDS_PER_SOURCE
    assert second == {"source": f"{three_sources[1]} (20 examples)", "format": "text", "records": RECORDS_PER_SOURCE,
                      "drawn": 20, "kept": 20, "supervised_tokens": second["supervised_tokens"]}
    assert first["kept"] + second["kept"] == report.kept
    assert first["supervised_tokens"] + second["supervised_tokens"] == report.supervised_tokens
    assert sum(part["drawn"] for part in report.sources) - report.unused == report.kept
    lines = "\n".join(report.summary_lines())
    assert f"source 2: {three_sources[1]} (20 examples), format text: {RECORDS_PER_SOURCE} records, 20 drawn, 20 kept" \
        in lines
    assert report.held_out == 6 and report.validation_kept == 6


def test_mixture_validation_split_is_a_file_read_with_the_data_settings(tokenizer, three_sources, tmp_path):
    validation = _jsonl(tmp_path / "validation.jsonl", [{"question": "Q", "answer": f"v {i}"} for i in range(3)])
    cfg = DataConfig(cache=False, validation_split=str(validation),
                     sources=[SourceConfig(source=three_sources[1], examples=4)])
    bundle = build_datasets(cfg, tokenizer, seed=0)
    assert len(bundle.validation) == 3 and bundle.report.validation_source == str(validation)
    cfg.validation_split = "test"
    with pytest.raises(DataError, match="with data.sources it must be a file"):
        build_datasets(cfg, tokenizer, seed=0)


def test_mixture_order_is_a_function_of_the_seed_and_the_records(tokenizer, three_sources):
    def build(seed: int, first: str = three_sources[0]):
        cfg = DataConfig(cache=False, sources=[SourceConfig(source=first, examples=40),
                                               SourceConfig(source=three_sources[1], weight=1.0)])
        train = build_datasets(cfg, tokenizer, seed=seed).train
        return [list(train[i].input_ids) for i in range(len(train))]

    assert build(3) == build(3)
    assert build(3) != build(4)


def test_mixture_is_in_the_cache_key(tokenizer, three_sources, tmp_path):
    def report(weight: float):
        cfg = DataConfig(cache_dir=str(tmp_path), sources=[SourceConfig(source=three_sources[0], weight=weight),
                                                           SourceConfig(source=three_sources[1], examples=5)])
        return build_datasets(cfg, tokenizer, seed=0).report

    assert report(1.0).cache == "miss"
    assert report(1.0).cache == "hit"
    assert report(3.0).cache == "miss"


def test_resume_with_a_changed_mixture_is_refused(tokenizer, three_sources, tmp_path):
    from otr_cli.train.checkpoints import CheckpointError, check_same_training_data
    from otr_cli.train.data_identity import train_data_fingerprint

    def fingerprint(examples: int) -> dict:
        cfg = DataConfig(cache=False, sources=[SourceConfig(source=three_sources[0], examples=examples),
                                               SourceConfig(source=three_sources[1], examples=5)])
        return train_data_fingerprint(build_datasets(cfg, tokenizer, seed=0).train, cfg)

    saved = fingerprint(10)
    assert saved["source"] == f"mixture of {three_sources[0]} (10 examples), {three_sources[1]} (5 examples)"
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"data_fingerprint": saved}))
    assert check_same_training_data(checkpoint, fingerprint(10), allow_changed=False) is None
    with pytest.raises(CheckpointError, match="the training data differ"):
        check_same_training_data(checkpoint, fingerprint(11), allow_changed=False)


@pytest.mark.parametrize("entry, message", [
    ({"source": "b.jsonl", "format": "alpacca"}, r"data.sources\[1\].format='alpacca' is not one of"),
    ({"source": ""}, r"data.sources\[1\].source is empty"),
    ({"source": "b.jsonl", "weight": 2, "examples": 5}, r"data.sources\[1\] sets both weight=2.0 and examples=5"),
    ({"source": "b.jsonl", "weight": 0}, r"data.sources\[1\].weight=0.0 must be a number above 0"),
    ({"source": "b.jsonl", "examples": 0}, r"data.sources\[1\].examples=0 must be a whole number >= 1"),
])
def test_a_bad_mixture_entry_is_named_by_its_index(entry, message):
    from otr_cli.app import compose_config

    def flow(mapping: dict) -> str:
        return "{" + ", ".join(f"{key}: '{value}'" if isinstance(value, str) else f"{key}: {value}"
                               for key, value in mapping.items()) + "}"

    sources = f"[{flow({'source': 'a.jsonl'})}, {flow(entry)}]"
    cfg = compose_config("train", "train", [f"data.sources={sources}"], TrainConfig)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_a_mixture_run_without_a_recipe_is_named_mixture():
    from otr_cli.app import compose_config

    cfg = compose_config("train", "train", ["data.sources=[{source: a.jsonl}, {source: b.jsonl}]"], TrainConfig)
    assert cfg.run.name == "smollm2-135m-instruct_mixture_sft"
