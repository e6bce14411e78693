"""One style for the plain commands (otr grade, otr eval compare, otr sweep summary): argparse flags with
--help, a bad argument as one line and exit 2, and the old key=value spelling kept for a release."""

from __future__ import annotations

import json

import pytest

from otr_cli.cli import main

# name: (the command, with its required arguments; what --help starts with; a flag --help lists)
PLAIN_COMMANDS = {
    "grade": (["grade", "p.jsonl", "--grader", "math"], "usage: otr grade", "--grader"),
    "eval-compare": (["eval", "compare", "a", "b"], "usage: otr eval compare", "--output"),
    "sweep-summary": (["sweep", "summary", "somewhere"], "usage: otr sweep summary", "--metric"),
}


def _exit_code(command: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(command)
    return exit_info.value.code


@pytest.mark.parametrize("name", PLAIN_COMMANDS)
def test_plain_command_help_lists_its_flags(name, capsys):
    command, usage, flag = PLAIN_COMMANDS[name]
    assert _exit_code([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(usage) and flag in out


@pytest.mark.parametrize("name", PLAIN_COMMANDS)
def test_plain_command_bad_argument_is_one_line_with_exit_2(name, capsys):
    command, _, _ = PLAIN_COMMANDS[name]
    assert _exit_code([*command, "--no-such-flag", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "unrecognized arguments: --no-such-flag 1" in err
    assert "--help" in err and "Traceback" not in err


def test_grade_bad_flag_value_is_one_line_with_exit_2(capsys):
    assert _exit_code(["grade", "p.jsonl", "--grader", "regex"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --grader: invalid choice: 'regex'" in err


def test_eval_compare_with_one_directory_is_one_line_with_exit_2(tmp_path, capsys):
    assert _exit_code(["eval", "compare", str(tmp_path)]) == 2
    assert "need at least two directories" in capsys.readouterr().err


def test_grade_old_key_value_spelling_still_works_with_a_deprecation_note(tmp_path, capsys):
    predictions = tmp_path / "preds.jsonl"
    predictions.write_text(json.dumps({"completion": "#### 7", "gold": "7"}) + "\n")
    out = tmp_path / "graded.jsonl"
    assert main(["grade", f"predictions={predictions}", "grader=math", f"output={out}"]) == 0
    captured = capsys.readouterr()
    assert "1/1 correct" in captured.out and json.loads(out.read_text())["correct"] is True
    assert "deprecated" in captured.err and f"otr grade {predictions} --grader math --output {out}" in captured.err


def test_eval_compare_old_output_spelling_still_works_with_a_deprecation_note(tmp_path, capsys):
    for name, correct in (("a", [True, False]), ("b", [True, True])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"model": name, "benchmarks": {"gsm8k": {}}}))
        (tmp_path / name / "gsm8k.jsonl").write_text(
            "".join(json.dumps({"id": i, "correct": c}) + "\n" for i, c in enumerate(correct)))
    chart = tmp_path / "cmp.png"
    assert main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b"), f"output={chart}"]) == 0
    assert chart.is_file() and chart.with_suffix(".json").is_file()
    err = capsys.readouterr().err
    assert "deprecated" in err and f"--output {chart}" in err


def test_a_directory_with_an_equals_sign_is_still_a_directory_for_eval_compare(tmp_path, capsys):
    """Hydra names sweep points' directories key=value: only output= is the old flag spelling."""
    assert _exit_code(["eval", "compare", str(tmp_path / "loss.beta=0"), str(tmp_path / "loss.beta=-0.1")]) == 2
    err = capsys.readouterr().err
    assert "loss.beta=0 is not a directory" in err and "deprecated" not in err
