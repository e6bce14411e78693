"""`otr grade`: grades a predictions file line by line, in order; bad input names file and line."""

import json

import pytest

from helpers import read_jsonl, run_cli
from otr_cli.command_line import CommandLineError
from otr_cli.eval.predictions import GradeInputError, parse_grade_args, read_predictions


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_grade_math_file_keeps_order_and_adds_correct_and_extracted(tmp_path):
    preds = write_lines(tmp_path / "preds.jsonl", [
        {"id": "a", "completion": r"so \boxed{\frac{1}{2}}", "gold": "0.5"},
        {"id": "b", "completion": "The answer is 7.", "gold": 8},
        {"id": "c", "completion": "#### 1,000", "gold": "1000"},
    ])
    out = tmp_path / "graded.jsonl"
    result = run_cli(["grade", str(preds), "--grader", "math", "--output", str(out)])
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert [r["correct"] for r in rows] == [True, False, True]
    assert rows[0]["extracted"] == r"\frac{1}{2}"
    assert "2/3 correct" in result.stdout


def test_grade_choice_file(tmp_path):
    preds = write_lines(tmp_path / "preds.jsonl", [{"completion": "The answer is (B)", "gold": 1},
                                                   {"completion": "Answer: D", "gold": "C"}])
    run_cli(["grade", str(preds), "--grader", "choice"])
    rows = read_jsonl(tmp_path / "preds.graded.jsonl")
    assert [(r["extracted"], r["correct"]) for r in rows] == [("B", True), ("D", False)]


def test_grade_code_file_reports_isolation_and_status(tmp_path):
    base = {"prompt": "def add(a, b):\n", "test": "def check(f):\n    assert f(2, 3) == 5\n", "entry_point": "add"}
    preds = write_lines(tmp_path / "preds.jsonl", [dict(base, completion="    return a + b\n"),
                                                   dict(base, completion="    import sys; sys.exit(0)\n")])
    result = run_cli(["grade", str(preds), "--grader", "code", "--workers", "2"])
    rows = read_jsonl(tmp_path / "preds.graded.jsonl")
    assert [(r["correct"], r["status"]) for r in rows] == [(True, "passed"), (False, "failed")]
    assert "sandbox isolation:" in result.stdout and "sandbox outcomes: failed 1, passed 1" in result.stdout
    assert rows[0]["extracted"] == "    return a + b\n"


def test_malformed_predictions_line_is_named_with_its_number(tmp_path):
    preds = write_lines(tmp_path / "preds.jsonl", [{"completion": "1", "gold": "1"}, "", "{not json"])
    result = run_cli(["grade", str(preds), "--grader", "math"], check=False)
    assert result.returncode == 2
    assert f"{preds}:3: malformed JSON" in " ".join((result.stderr + result.stdout).split())


@pytest.mark.parametrize("lines, grader, message", [
    ([{"completion": "1"}], "math", ":1: missing field(s) gold"),
    ([{"completion": "1", "gold": "1"}, {"gold": "2"}], "math", ":2: missing field(s) completion"),
    ([{"completion": "x", "gold": "1", "prompt": "p", "test": "t"}], "code", ":1: missing field(s) entry_point"),
    ([{"completion": "(A)", "gold": "Z"}], "choice", ":1: gold 'Z' is not a choice letter"),
    (["[1, 2]"], "math", ":1: expected a JSON object, got list"),
    ([{"completion": 5, "gold": "5"}], "math", ":1: field 'completion' must be a string"),
])
def test_bad_predictions_lines_get_clear_errors(tmp_path, lines, grader, message):
    preds = write_lines(tmp_path / "preds.jsonl", lines)
    with pytest.raises(GradeInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_predictions(preds, grader)


def test_missing_file_and_unknown_grader_are_rejected(tmp_path):
    with pytest.raises(GradeInputError, match="does not exist"):
        read_predictions(tmp_path / "nope.jsonl", "math")
    with pytest.raises(GradeInputError, match="grader='regex' is not one of"):
        read_predictions(tmp_path / "nope.jsonl", "regex")


def test_grade_arguments_are_checked():
    with pytest.raises(CommandLineError, match="required: --grader"):
        parse_grade_args(["x.jsonl"])
    with pytest.raises(CommandLineError, match="unrecognized arguments: --gradr"):
        parse_grade_args(["x.jsonl", "--grader", "math", "--gradr", "math"])
    options = parse_grade_args(["x.jsonl", "--grader", "code", "--timeout", "5", "--memory-mb", "512"])
    assert (str(options.predictions), options.grader, options.timeout, options.memory_mb) == ("x.jsonl", "code", 5.0, 512)
