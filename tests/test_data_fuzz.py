"""Bad data files, drawn at random (tests/data_fuzz.py): each ends in a one-line DataError naming the file, or
trains on what is left with the drops counted; never a traceback, never a run with nothing to train on."""

from __future__ import annotations

import json
import random

import pytest

from data_fuzz import Case, make_case
from helpers import run_cli, tiny_overrides
from otr_cli.config import DataConfig
from otr_cli.data import DataError, build_datasets
from otr_cli.errors import USER_ERROR_EXIT

FUZZ_SEED = 0
FUZZ_CASES = 300


def case_at(seed: int, index: int) -> Case:
    """The `index`-th case (0-based) drawn from `seed`: how a bug the fuzz found is kept as a fixed test."""
    rng = random.Random(seed)
    for _ in range(index):
        make_case(rng)
    return make_case(rng)


def build(case: Case, tmp_path, name: str = "case"):
    path = tmp_path / f"{name}{case.suffix}"
    path.write_bytes(case.content)
    return path, build_datasets(DataConfig(source=str(path), cache=False, **case.settings), _tokenizer(), seed=0)


_TOKENIZER = []


def _tokenizer():
    if not _TOKENIZER:
        from otr_cli.models import load_tokenizer

        _TOKENIZER.append(load_tokenizer("smollm2-135m-instruct"))
    return _TOKENIZER[0]


def outcome(case: Case, tmp_path, index: int) -> str:
    """'error' (a one-line DataError naming the file) or 'trained' (some examples kept); fails otherwise."""
    path = tmp_path / f"case{index}{case.suffix}"
    try:
        _, bundle = build(case, tmp_path, f"case{index}")
    except DataError as error:
        message = str(error)
        assert "\n" not in message and str(path) in message, (index, case.name, message)
        return "error"
    except Exception as error:  # noqa: BLE001 - any other exception is the bug this test looks for
        pytest.fail(f"case {index} ({case.name}): {type(error).__name__}: {error}")
    report = bundle.report
    assert report.kept >= 1 and report.supervised_tokens > 0, (index, case.name, report.as_dict())
    assert report.loaded == report.kept + report.dropped_too_long + report.dropped_no_supervised, (index, case.name)
    return "trained"


@pytest.mark.faults
def test_fuzzed_bad_data_ends_in_a_one_line_error_naming_the_file_or_in_counted_drops(tmp_path):
    rng = random.Random(FUZZ_SEED)
    outcomes = [outcome(make_case(rng), tmp_path, index) for index in range(FUZZ_CASES)]
    # Most cases are mistakes that must stop the run; the rest train on the good records, drops counted.
    assert outcomes.count("error") > FUZZ_CASES // 2 and "trained" in outcomes


# Bugs the fuzz found (FUZZ_SEED, case index), each kept as a test of its own.

@pytest.mark.faults
def test_a_record_with_no_assistant_reply_is_dropped_and_counted_not_kept_with_weight_0(tmp_path):
    case = case_at(FUZZ_SEED, 88)
    assert case.name == "jsonl line 1: user only"  # the only record: a user turn, no reply
    with pytest.raises(DataError) as error:
        build(case, tmp_path)
    message = str(error.value)
    assert "1 with no supervised token left" in message and message.endswith("; the first is " +
                                                                          str(tmp_path / "case.jsonl") + ":1")
    assert "a record with no assistant reply: add one" in message

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}) + "\n")
    report = build_datasets(DataConfig(source=str(mixed), cache=False), _tokenizer(), seed=0).report
    assert (report.kept, report.dropped_no_supervised, report.zero_weight_examples) == (1, 1, 0)


@pytest.mark.faults
def test_every_example_weighted_0_is_an_error_not_a_run_that_trains_on_nothing(tmp_path):
    case = case_at(FUZZ_SEED, 7)
    assert case.name == "lengths: all weights 0"
    with pytest.raises(DataError, match=r"no training example of .*case.jsonl has a supervised token: all 3 kept "
                                        r"have weight 0"):
        build(case, tmp_path)


@pytest.mark.faults
def test_a_validation_set_weighted_0_throughout_is_an_error_not_a_validation_loss_of_0(tmp_path):
    train, validation = tmp_path / "train.jsonl", tmp_path / "validation.jsonl"
    reply = {"role": "assistant", "content": "4"}
    train.write_text(json.dumps({"messages": [{"role": "user", "content": "2+2?"}, reply]}) + "\n")
    validation.write_text(json.dumps({"messages": [{"role": "user", "content": "2+2?"}, {**reply, "weight": 0}]}) + "\n")
    cfg = DataConfig(source=str(train), validation_split=str(validation), cache=False)
    with pytest.raises(DataError, match=r"no validation example of .*validation.jsonl has a supervised token"):
        build_datasets(cfg, _tokenizer(), seed=0)


@pytest.mark.slow
@pytest.mark.faults
def test_a_record_on_a_1_mb_line_is_truncated_or_dropped_and_counted(tmp_path):
    huge = "word " * (200 * 1024)  # 1 MiB of text in one message
    path = tmp_path / "huge.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": prompt},
                                                     {"role": "assistant", "content": reply}]}) + "\n"
                            for prompt, reply in [("hi", "ok"), (huge, "ok"), ("hi", huge)]))
    report = build_datasets(DataConfig(source=str(path), cache=False, max_length=64), _tokenizer(), seed=0).report
    # The huge prompt leaves its reply beyond the cut (dropped); the huge reply is cut to 64 tokens (kept).
    assert (report.kept, report.truncated, report.dropped_no_supervised) == (2, 2, 1)


@pytest.mark.faults
def test_csv_rows_with_one_cell_more_than_the_header_are_an_error_not_values_shifted_by_one(tmp_path):
    case = case_at(FUZZ_SEED, 79)
    assert case.content == b"question,answer\na,b,c\n"  # pandas made column 'a' the index: question=b, answer=c
    with pytest.raises(DataError, match=r"case.csv:2: cannot read as CSV \(3 cells, the header has 2: "
                                        r"question, answer\)"):
        build(case, tmp_path)


@pytest.mark.faults
def test_an_empty_role_is_an_error(tmp_path):
    case = case_at(FUZZ_SEED, 271)
    assert case.name == "jsonl line 2: role of message 0" and b'"role": ""' in case.content
    with pytest.raises(DataError, match=r"case.jsonl:2: message 0 of field 'messages': role should be text such "
                                        r"as 'user' or 'assistant', got ''"):
        build(case, tmp_path)


@pytest.mark.faults
def test_an_infinite_number_as_an_answer_is_an_error_not_the_text_inf(tmp_path):
    case = case_at(FUZZ_SEED, 296)
    assert case.content == b'{"question": "2+2?", "answer": Infinity}\n'
    with pytest.raises(DataError, match=r"case.jsonl:1: field 'answer' \(data.answer_field\) should be text, got "
                                        r"the number inf"):
        build(case, tmp_path)


@pytest.mark.faults
def test_a_utf8_byte_order_mark_at_the_start_of_a_file_is_not_an_error(tmp_path):
    case = case_at(FUZZ_SEED, 0)
    assert case.content.startswith(b"\xef\xbb\xbf{")  # saved by an editor that writes a BOM
    _, bundle = build(case, tmp_path)
    assert bundle.report.kept == 1
    csv_path = tmp_path / "bom.csv"
    csv_path.write_bytes(b"\xef\xbb\xbfquestion,answer\n1+1?,2\n")
    assert build_datasets(DataConfig(source=str(csv_path), cache=False), _tokenizer(), seed=0).report.kept == 1


@pytest.mark.faults
@pytest.mark.parametrize("index", [2, 53, 85], ids=["empty", "header only", "one line"])
def test_a_csv_with_no_data_row_says_it_has_no_records(tmp_path, index):
    case = case_at(FUZZ_SEED, index)
    assert case.suffix == ".csv" and case.content.count(b"\n") <= 1
    with pytest.raises(DataError, match=r"case.csv has no records \(data.source / data.split\)$"):
        build(case, tmp_path)


# The same through `otr train`, as a user meets it: exit 2, one line on stderr, no traceback.
BAD_FILES = {
    "invalid_utf8.jsonl": (b'{"question": "1+1?", "answer": "2"}\n{"question": "\xff", "answer": "2"}\n',
                           "invalid_utf8.jsonl:2: not UTF-8 text"),
    "array.jsonl": (b'[{"question": "1+1?", "answer": "2"}]\n', "array.jsonl:1: expected a JSON object per line"),
    "weights.jsonl": (b'{"messages": [{"role": "user", "content": "1+1?"}, '
                      b'{"role": "assistant", "content": "2", "weight": 0}]}\n', "has a supervised token"),
    "missing.csv": (b"question\n1+1?\n", "missing.csv:2: cannot tell the format of this record"),
}


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_otr_train_on_bad_data_exits_2_with_one_line_naming_the_file(tiny_model_dir, tmp_path, name):
    content, expected = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    result = run_cli(["train", *tiny_overrides(tiny_model_dir, tmp_path / "run", f"data.source={path}",
                                               "data.cache=false", "dry_run=false")], check=False)
    assert result.returncode == USER_ERROR_EXIT, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0] and str(path) in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
