"""`otr eval compare`: paired table, McNemar p-values, bar chart and clear errors."""

import json

import pytest

from helpers import run_cli
from otr_cli.eval.compare import CompareError, compare_runs, find_eval_dir, load_run


def make_eval_dir(directory, outcomes: dict[str, list[bool]], model="m"):
    directory.mkdir(parents=True)
    benchmarks = {}
    for name, correct in outcomes.items():
        rows = [{"id": f"{name}-{i}", "correct": c} for i, c in enumerate(correct)]
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        benchmarks[name] = {"accuracy": sum(correct) / len(correct), "correct": sum(correct), "n": len(correct)}
    (directory / "results.json").write_text(json.dumps({"model": model, "benchmarks": benchmarks}))
    return directory


def test_compare_pairs_problems_by_id_and_tests_with_mcnemar(tmp_path):
    a = make_eval_dir(tmp_path / "a" / "eval", {"gsm8k": [True] * 10 + [False] * 10})
    b = make_eval_dir(tmp_path / "b" / "eval", {"gsm8k": [True] * 18 + [False] * 2})
    [row] = compare_runs([load_run(tmp_path / "a"), load_run(tmp_path / "b")])
    assert row["n"] == 20 and row["delta"] == pytest.approx(0.4)
    assert (row["baseline_only"], row["run_only"]) == (0, 8) and row["mcnemar_p"] == pytest.approx(2 / 2 ** 8)
    assert row["delta_ci95"][0] > 0
    assert find_eval_dir(tmp_path / "a") == a and find_eval_dir(b) == b


def test_training_run_directories_are_found_through_eval_final(tmp_path):
    make_eval_dir(tmp_path / "run" / "eval" / "final", {"gsm8k": [True]})
    assert find_eval_dir(tmp_path / "run") == tmp_path / "run" / "eval" / "final"


@pytest.mark.slow
def test_compare_command_prints_table_and_writes_png_and_json(tmp_path):
    make_eval_dir(tmp_path / "a", {"gsm8k": [True, False] * 10, "svamp": [False] * 20})
    make_eval_dir(tmp_path / "b", {"gsm8k": [True] * 20, "svamp": [True, False] * 10})
    chart = tmp_path / "cmp.png"
    result = run_cli(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(chart)])
    assert "McNemar" in result.stdout and "gsm8k" in result.stdout and "svamp" in result.stdout
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads(chart.with_suffix(".json").read_text())["comparisons"]) == 2


@pytest.mark.slow
def test_compare_without_results_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    make_eval_dir(tmp_path / "b", {"gsm8k": [True]})
    result = run_cli(["eval", "compare", str(tmp_path / "empty"), str(tmp_path / "b")], check=False)
    assert result.returncode == 2 and "no results.json" in " ".join(result.stderr.split())


@pytest.mark.slow
def test_compare_needs_two_directories_and_a_shared_benchmark(tmp_path):
    make_eval_dir(tmp_path / "a", {"gsm8k": [True]})
    make_eval_dir(tmp_path / "b", {"svamp": [True]})
    with pytest.raises(CompareError, match="share no benchmark"):
        compare_runs([load_run(tmp_path / "a"), load_run(tmp_path / "b")])
    result = run_cli(["eval", "compare", str(tmp_path / "a")], check=False)
    assert result.returncode == 2 and "at least two" in " ".join(result.stderr.split())
