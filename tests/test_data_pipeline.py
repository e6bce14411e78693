"""build_datasets: truncation policy and counts, shuffling, max_examples, validation, report, errors."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest

from otr_cli.config import ConfigError, DataConfig, SyntheticArithConfig
from otr_cli.data import IGNORE_INDEX, DataError, build_datasets, encode_conversation, to_messages

GSM8K_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
SMALL_SYNTHETIC = SyntheticArithConfig(num_train=40, num_validation=8, num_test=8)


@pytest.fixture(scope="module")
def tokenizer():
    from otr_cli.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


def _qa_file(path: Path, answers: list[str], question: str = "Q?") -> Path:
    path.write_text("".join(json.dumps({"question": f"{question} {i}", "answer": a}) + "\n"
                            for i, a in enumerate(answers)))
    return path


def _full_length(record: dict, tokenizer) -> int:
    return len(encode_conversation(to_messages(record, DataConfig()), tokenizer, None).input_ids)


def _assert_report_adds_up(report):
    assert report.loaded - report.held_out - report.unused == \
        report.kept + report.dropped_too_long + report.dropped_no_supervised


def test_synthetic_arith_builds_train_and_its_own_validation_split(tokenizer):
    bundle = build_datasets(DataConfig(synthetic=SMALL_SYNTHETIC), tokenizer, seed=0)
    assert len(bundle.train) == 40 and len(bundle.validation) == 8
    report = bundle.report
    assert (report.kept, report.validation_kept, report.format) == (40, 8, "question_answer")
    assert report.validation_source == "synthetic_arith (split validation)"
    assert report.supervised_tokens == sum(ex.num_supervised for ex in bundle.train)
    assert report.total_tokens == sum(len(ex.input_ids) for ex in bundle.train)
    _assert_report_adds_up(report)
    text = "\n".join(report.summary_lines())
    assert "40 examples kept" in text and "supervised" in text and "validation: 8 of 8" in text
    assert set(report.as_dict()) >= {"loaded", "kept", "truncated", "dropped_too_long", "dropped_no_supervised",
                                     "validation_kept", "supervised_tokens", "total_tokens"}


def test_truncate_keeps_the_first_max_length_tokens_and_counts_them(tokenizer, tmp_path):
    long_answer = " ".join(f"word{i}" for i in range(80))
    path = _qa_file(tmp_path / "qa.jsonl", ["short", long_answer])
    full = _full_length({"question": "Q? 1", "answer": long_answer}, tokenizer)
    limit = full - 20
    cfg = DataConfig(source=str(path), max_length=limit, truncation="truncate", shuffle=False)
    bundle = build_datasets(cfg, tokenizer, seed=0)
    assert bundle.report.truncated == 1 and bundle.report.kept == 2 and bundle.report.dropped_too_long == 0
    untruncated = encode_conversation(to_messages({"question": "Q? 1", "answer": long_answer}, cfg), tokenizer, None)
    assert bundle.train[1].input_ids == untruncated.input_ids[:limit]
    assert bundle.train[1].labels == untruncated.labels[:limit]
    _assert_report_adds_up(bundle.report)


def test_drop_counts_long_examples_and_dropping_all_suggests_a_larger_max_length(tokenizer, tmp_path):
    long_answer = " ".join(f"word{i}" for i in range(80))
    path = _qa_file(tmp_path / "qa.jsonl", ["short", long_answer, long_answer])
    limit = _full_length({"question": "Q? 0", "answer": "short"}, tokenizer) + 5
    bundle = build_datasets(DataConfig(source=str(path), max_length=limit, truncation="drop"), tokenizer, seed=0)
    assert (bundle.report.kept, bundle.report.dropped_too_long, bundle.report.truncated) == (1, 2, 0)
    assert f"2 dropped as longer than data.max_length={limit}" in "\n".join(bundle.report.summary_lines())
    _assert_report_adds_up(bundle.report)

    only_long = _qa_file(tmp_path / "long.jsonl", [long_answer, long_answer])
    with pytest.raises(DataError) as info:
        build_datasets(DataConfig(source=str(only_long), max_length=limit, truncation="drop"), tokenizer, seed=0)
    message = str(info.value)
    assert str(only_long) in message and "2 longer than data.max_length" in message
    assert "raise data.max_length" in message


def test_examples_whose_reply_is_cut_off_are_dropped_and_counted(tokenizer, tmp_path):
    path = _qa_file(tmp_path / "qa.jsonl", ["a short reply", "another"], question="word " * 60)
    prompt_only = _full_length({"question": "word " * 60 + " 0", "answer": "a short reply"}, tokenizer) - 8
    with pytest.raises(DataError, match=r"2 with no supervised token left .*raise data.max_length"):
        build_datasets(DataConfig(source=str(path), max_length=prompt_only), tokenizer, seed=0)

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"question": "word " * 60, "answer": "cut"}) + "\n"
                     + json.dumps({"question": "short", "answer": "kept"}) + "\n")
    bundle = build_datasets(DataConfig(source=str(mixed), max_length=prompt_only), tokenizer, seed=0)
    report = bundle.report
    assert (report.kept, report.dropped_no_supervised, report.truncated) == (1, 1, 1)
    assert all(any(label != IGNORE_INDEX for label in ex.labels) for ex in bundle.train)
    _assert_report_adds_up(report)


def test_seeded_shuffle_is_deterministic_and_depends_on_the_seed(tokenizer):
    cfg = DataConfig(synthetic=SMALL_SYNTHETIC)
    ids = lambda bundle: [tuple(ex.input_ids) for ex in bundle.train]  # noqa: E731
    first, again = build_datasets(cfg, tokenizer, seed=1), build_datasets(cfg, tokenizer, seed=1)
    other = build_datasets(cfg, tokenizer, seed=2)
    unshuffled = build_datasets(DataConfig(synthetic=SMALL_SYNTHETIC, shuffle=False), tokenizer, seed=1)
    assert ids(first) == ids(again)
    assert ids(first) != ids(other) and sorted(ids(first)) == sorted(ids(other))
    assert ids(first) != ids(unshuffled) and sorted(ids(first)) == sorted(ids(unshuffled))


def test_max_examples_keeps_the_first_shuffled_examples_and_reports_the_rest_unused(tokenizer):
    full = build_datasets(DataConfig(synthetic=SMALL_SYNTHETIC), tokenizer, seed=3)
    capped = build_datasets(DataConfig(synthetic=SMALL_SYNTHETIC, max_examples=10), tokenizer, seed=3)
    assert [ex.input_ids for ex in capped.train] == [ex.input_ids for ex in full.train[:10]]
    assert (capped.report.kept, capped.report.unused) == (10, 30)
    _assert_report_adds_up(capped.report)


def test_validation_size_holds_out_the_same_records_whatever_the_seed(tokenizer, tmp_path):
    path = _qa_file(tmp_path / "qa.jsonl", [f"answer {i}" for i in range(20)])
    by_fraction = [build_datasets(DataConfig(source=str(path), validation_size=0.25), tokenizer, seed=s)
                   for s in (1, 2)]
    assert len(by_fraction[0].validation) == 5 and len(by_fraction[0].train) == 15
    assert [ex.input_ids for ex in by_fraction[0].validation] == [ex.input_ids for ex in by_fraction[1].validation]
    held = {tuple(ex.input_ids) for ex in by_fraction[0].validation}
    assert not held & {tuple(ex.input_ids) for ex in by_fraction[0].train}
    assert by_fraction[0].report.held_out == 5
    _assert_report_adds_up(by_fraction[0].report)
    by_count = build_datasets(DataConfig(source=str(path), validation_size=3), tokenizer, seed=1)
    assert (len(by_count.validation), len(by_count.train)) == (3, 17)
    with pytest.raises(DataError, match="leaving none to train on"):
        build_datasets(DataConfig(source=str(path), validation_size=20), tokenizer, seed=1)


def test_validation_split_reads_another_split_of_a_directory_or_a_file(tokenizer, tmp_path):
    _qa_file(tmp_path / "train.jsonl", ["a", "b", "c"])
    _qa_file(tmp_path / "test.jsonl", ["x", "y"])
    bundle = build_datasets(DataConfig(source=str(tmp_path), validation_split="test"), tokenizer, seed=0)
    assert (len(bundle.train), len(bundle.validation)) == (3, 2)
    from_file = build_datasets(DataConfig(source=str(tmp_path / "train.jsonl"),
                                          validation_split=str(tmp_path / "test.jsonl")), tokenizer, seed=0)
    assert len(from_file.validation) == 2
    with pytest.raises(ConfigError, match="set data.validation_size=0 or data.validation_split=null"):
        build_datasets(DataConfig(source=str(tmp_path), validation_split="test", validation_size=0.5), tokenizer, 0)


def test_gsm8k_lines_train_with_the_question_answer_map(tokenizer, tmp_path):
    if not GSM8K_TRAIN.is_file():
        pytest.skip(f"{GSM8K_TRAIN} not present")
    sample = tmp_path / "train.jsonl"
    with open(GSM8K_TRAIN) as handle:
        sample.write_text("".join(islice(handle, 4)))
    bundle = build_datasets(DataConfig(source=str(sample), format="question_answer", max_length=1024), tokenizer, 0)
    assert bundle.report.kept == 4 and bundle.report.truncated == 0
    replies = {tokenizer.decode([t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE_INDEX])
               for ex in bundle.train}
    assert "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips " \
           "altogether in April and May.\n#### 72<|im_end|>" in replies


def test_prompt_completion_parquet_trains(tokenizer, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "pc.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "Say hi", "completion": "hi"},
                                         {"prompt": "Say bye", "completion": "bye"}]), path)
    bundle = build_datasets(DataConfig(source=str(path), system_prompt="Be terse."), tokenizer, seed=0)
    assert bundle.report.format == "prompt_completion" and bundle.report.kept == 2
    text = tokenizer.decode(bundle.train[0].input_ids)
    assert text.startswith("<|im_start|>system\nBe terse.<|im_end|>") and "SmolLM" not in text


def test_bad_records_fail_the_build_with_file_and_line(tokenizer, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "q", "answer": "a"}\n{"question": "q", "answer": "a",}\n')
    with pytest.raises(DataError, match=rf"{broken}:2: malformed JSON"):
        build_datasets(DataConfig(source=str(broken)), tokenizer, seed=0)
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"question": "q", "answer": "a"}\n\n{"question": "q", "solution": "a"}\n')
    with pytest.raises(DataError, match=rf"{missing}:3: missing field 'answer'.*data.answer_field"):
        build_datasets(DataConfig(source=str(missing)), tokenizer, seed=0)
    empty = _qa_file(tmp_path / "empty.jsonl", ["fine", ""])
    with pytest.raises(DataError, match=rf"{empty}:2: empty assistant message"):
        build_datasets(DataConfig(source=str(empty)), tokenizer, seed=0)
