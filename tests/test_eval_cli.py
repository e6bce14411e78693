"""`otr eval` from the command line: Hydra overrides, model=PATH, output layout, clear errors."""

import json

import pytest

from helpers import SHARED_DATA, read_jsonl, run_cli
from otr_cli.app import recipes_dir
from otr_cli.cli import main
from otr_cli.eval.app import rewrite_model_override


def test_model_equals_path_means_name_or_path_but_group_options_stay():
    assert rewrite_model_override(["model=outputs/x/final", "model=smollm2_135m_instruct", "eval.limit=2"],
                                  recipes_dir()) == ["model.name_or_path=outputs/x/final",
                                                     "model=smollm2_135m_instruct", "eval.limit=2"]


@pytest.mark.slow
def test_otr_eval_on_a_model_directory_writes_eval_outputs(tiny_model_dir, tmp_path):
    result = run_cli(["eval", f"model={tiny_model_dir}", "eval.benchmarks=[svamp,mmlu_stem]", "eval.limit=2",
                      "eval.max_new_tokens=4", f"eval.data_dir={SHARED_DATA}", f"run.output_dir={tmp_path}"])
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert set(summary) == {"svamp", "mmlu_stem"} and summary["svamp"]["n"] == 2
    assert len(read_jsonl(tmp_path / "eval" / "mmlu_stem.jsonl")) == 2
    assert "svamp" in result.stdout and "95% CI" in result.stdout


@pytest.mark.slow
def test_otr_eval_unknown_benchmark_is_a_clear_error(tmp_path):
    result = run_cli(["eval", "eval.benchmarks=[gsm9k]", f"run.output_dir={tmp_path}"], check=False)
    assert result.returncode == 2 and "unknown benchmark 'gsm9k'" in " ".join(result.stderr.split())


@pytest.mark.slow
def test_otr_eval_unknown_key_suggests_the_right_one(tmp_path):
    result = run_cli(["eval", "eval.limt=3"], check=False)
    assert result.returncode == 2 and "eval.limit" in result.stderr


def test_otr_grade_and_eval_are_listed_in_help():
    result = run_cli(["--help"])
    assert "otr eval compare" in result.stdout and "otr grade" in result.stdout


@pytest.mark.slow
def test_real_model_end_to_end_on_gsm8k_and_svamp(tmp_path):
    """SmolLM2-135M-Instruct on 2 GSM8K and 2 SVAMP problems from ../shared/data, short answers."""
    run_cli(["eval", "model=smollm2-135m-instruct", "eval.benchmarks=[gsm8k,svamp]", "eval.limit=2",
             "eval.max_new_tokens=40", f"eval.data_dir={SHARED_DATA}", f"run.output_dir={tmp_path}"], timeout=900)
    for name in ("gsm8k", "svamp"):
        rows = read_jsonl(tmp_path / "eval" / f"{name}.jsonl")
        assert len(rows) == 2 and all(len(r["completion"]) > 20 for r in rows)
        assert all(isinstance(r["correct"], bool) for r in rows)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["model"] == "smollm2-135m-instruct" and results["benchmarks"]["gsm8k"]["n"] == 2


@pytest.mark.slow
def test_otr_eval_under_torchrun_shares_the_problems_and_equals_one_process(tiny_model_dir, tmp_path):
    from ranks import start_ranks, wait_all

    common = ["eval", f"model={tiny_model_dir}", "eval.benchmarks=[gsm8k]", "eval.limit=5", "eval.batch_size=2",
              "eval.max_new_tokens=8", f"eval.data_dir={SHARED_DATA}"]
    main([*common, f"run.output_dir={tmp_path / 'one'}"])  # the reference in this process: one start less
    processes = start_ranks([*common, f"run.output_dir={tmp_path / 'two'}"], tmp_path, world=2)
    codes = wait_all(processes, timeout=300)
    assert codes == [0, 0], (tmp_path / "rank0.log").read_text()[-3000:] + (tmp_path / "rank1.log").read_text()[-3000:]
    # 3 batches (2, 2 and 1 prompts) dealt by tokens: each rank generated, together all 5; the files are those
    # of one process.
    generated = [len(read_jsonl(tmp_path / "two" / "eval" / name))
                 for name in ("generation_cache.jsonl", "generation_cache.rank1.jsonl")]
    assert sorted(generated) == [2, 3], generated
    assert read_jsonl(tmp_path / "two" / "eval" / "gsm8k.jsonl") == read_jsonl(tmp_path / "one" / "eval" / "gsm8k.jsonl")
    assert "95% CI" in (tmp_path / "rank0.log").read_text() and "95% CI" not in (tmp_path / "rank1.log").read_text()
