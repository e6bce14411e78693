"""evaluate_model on a tiny random model: output files, generation cache and resume, benchmark errors."""

import json

import pytest

from helpers import SHARED_DATA, read_jsonl
from otr_cli.config import ConfigError, DataConfig, EvalConfig
from otr_cli.eval import runner
from otr_cli.eval.benchmarks import BenchmarkError, load_benchmark


def cfg(**overrides) -> EvalConfig:
    base = dict(benchmarks=["gsm8k"], limit=4, batch_size=2, max_new_tokens=6, data_dir=str(SHARED_DATA))
    return EvalConfig(**(base | overrides))


def test_eval_writes_predictions_summary_and_training_compatible_results(tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    results = runner.evaluate_model(str(tiny_model_dir), cfg(benchmarks=["gsm8k", "synthetic_arith"]), DataConfig(),
                                    out)
    assert set(results) == {"gsm8k", "synthetic_arith"}
    for scores in results.values():
        assert {"accuracy", "correct", "n", "metric", "value", "ci95"} <= set(scores) and scores["n"] == 4
    stored = json.loads((out / "results.json").read_text())
    assert stored["model"] == str(tiny_model_dir) and set(stored["benchmarks"]) == set(results)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["gsm8k"]) == {"metric", "value", "n", "ci95"}
    rows = read_jsonl(out / "gsm8k.jsonl")
    assert len(rows) == 4 and {"id", "prompt", "completion", "extracted", "gold", "correct"} <= set(rows[0])
    assert rows[0]["gold"] == "18" and "\\boxed{}" in rows[0]["prompt"]
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


@pytest.mark.faults
def test_interrupted_eval_resumes_without_regenerating_finished_samples(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    original_put = runner.GenerationCache.put_many
    calls = {"n": 0}

    def put_then_crash(self, items):
        original_put(self, items)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt  # the user pressed Ctrl-C after the first batch was cached

    monkeypatch.setattr(runner.GenerationCache, "put_many", put_then_crash)
    with pytest.raises(KeyboardInterrupt):
        runner.evaluate_model(str(tiny_model_dir), cfg(), DataConfig(), out)
    monkeypatch.setattr(runner.GenerationCache, "put_many", original_put)
    generated = []
    original_generate = runner.generate_hf

    def spy(model, tokenizer, prompts, settings, **kwargs):
        generated.extend(prompts[i] for batch in kwargs["batches"] for i in batch)
        return original_generate(model, tokenizer, prompts, settings, **kwargs)

    monkeypatch.setattr(runner, "generate_hf", spy)
    resumed = runner.evaluate_model(str(tiny_model_dir), cfg(), DataConfig(), out)
    assert len(generated) == 2 and resumed["gsm8k"]["n"] == 4
    fresh = runner.evaluate_model(str(tiny_model_dir), cfg(cache=False), DataConfig(), tmp_path / "fresh")
    assert ([r["completion"] for r in read_jsonl(out / "gsm8k.jsonl")]
            == [r["completion"] for r in read_jsonl(tmp_path / "fresh" / "gsm8k.jsonl")])
    assert fresh == resumed


def test_fully_cached_eval_does_not_load_the_model(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    runner.evaluate_model(str(tiny_model_dir), cfg(limit=2), DataConfig(), out)

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although every completion was cached")

    monkeypatch.setattr("otr_cli.models.load_model", refuse)
    runner.evaluate_model(str(tiny_model_dir), cfg(limit=2), DataConfig(), out)


def test_changed_generation_settings_do_not_reuse_the_cache(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    runner.evaluate_model(str(tiny_model_dir), cfg(limit=2), DataConfig(), out)
    generated = []
    original_generate = runner.generate_hf
    monkeypatch.setattr(runner, "generate_hf", lambda m, t, prompts, s, **k: generated.extend(
        prompts[i] for batch in k["batches"] for i in batch) or original_generate(m, t, prompts, s, **k))
    runner.evaluate_model(str(tiny_model_dir), cfg(limit=2, max_new_tokens=7), DataConfig(), out)
    assert len(generated) == 2


def test_torn_cache_line_is_ignored(tmp_path):
    from otr_cli.eval.generation_cache import GenerationCache

    path = tmp_path / "cache.jsonl"
    path.write_text(json.dumps({"key": "a", "completions": ["x"]}) + "\n" + '{"key": "b", "compl')
    cache = GenerationCache(path)
    assert cache.get("a") == ["x"] and cache.get("b") is None
    cache.put_many([("c", ["y"])])
    assert GenerationCache(path).get("c") == ["y"]


def test_code_benchmark_is_graded_in_the_sandbox(tiny_model_dir, tmp_path):
    results = runner.evaluate_model(str(tiny_model_dir), cfg(benchmarks=["humaneval"], limit=2), DataConfig(),
                                    tmp_path / "eval")
    rows = read_jsonl(tmp_path / "eval" / "humaneval.jsonl")
    assert results["humaneval"]["grader"] == "code" and all(r["status"] != "passed" for r in rows)


def test_num_samples_reports_pass_at_k(tiny_model_dir, tmp_path):
    results = runner.evaluate_model(str(tiny_model_dir), cfg(limit=2, num_samples=3, temperature=1.0), DataConfig(),
                                    tmp_path / "eval")
    assert results["gsm8k"]["metric"] == "pass@1" and "pass@3" in results["gsm8k"]
    assert len(read_jsonl(tmp_path / "eval" / "gsm8k.jsonl")[0]["completions"]) == 3


@pytest.mark.parametrize("overrides, message", [
    (dict(benchmarks=["gsm9k"]), "unknown benchmark 'gsm9k'"),
    (dict(batch_size=0), "eval.batch_size=0 must be > 0"),
    (dict(num_samples=4), "eval.num_samples=4 with eval.temperature=0"),
    (dict(backend="tgi"), "eval.backend='tgi'"),
])
def test_bad_eval_config_is_rejected_with_its_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        runner.check_eval_config(cfg(**overrides))


def test_missing_benchmark_file_names_the_expected_layout(tmp_path):
    with pytest.raises(BenchmarkError, match=r"math500/test.jsonl does not exist.*eval.paths.math500"):
        load_benchmark("math500", cfg(data_dir=str(tmp_path)), DataConfig())


def test_explicit_benchmark_path_beats_data_dir(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    [problem] = load_benchmark("math500", cfg(paths={"math500": str(path)}), DataConfig())
    assert problem.question == "1+1?" and problem.gold == "2"


def test_all_shared_benchmarks_load(tmp_path):
    for name, grader in (("gsm8k", "math"), ("svamp", "math"), ("mmlu_stem", "choice"), ("humaneval", "code")):
        problems = load_benchmark(name, cfg(), DataConfig(), limit=3)
        assert len(problems) == 3 and problems[0].grader == grader
    assert len(load_benchmark("humaneval", cfg(), DataConfig())) == 164


def test_custom_benchmark_uses_field_maps(tmp_path):
    path = tmp_path / "custom.jsonl"
    path.write_text(json.dumps({"q": "2+3?", "a": 5}) + "\n" + json.dumps({"q": "1+1?"}) + "\n")
    custom = cfg(benchmarks=["custom"], custom_path=str(path), custom_question_field="q", custom_answer_field="a")
    with pytest.raises(BenchmarkError, match=r"custom.jsonl:2: missing field\(s\) a"):
        load_benchmark("custom", custom, DataConfig())
    path.write_text(json.dumps({"q": "2+3?", "a": 5}) + "\n")
    [problem] = load_benchmark("custom", custom, DataConfig())
    assert (problem.question, problem.gold, problem.grader) == ("2+3?", "5", "math")


def test_benchmarks_load_from_hub_ids_when_no_data_dir(monkeypatch):
    seen = []

    def fake_load_records(source, split, subset=None):
        seen.append((source, subset, split))
        return [{"question": "q", "answer": "x\n#### 3"}]

    monkeypatch.setattr("otr_cli.data.load_records", fake_load_records)
    [problem] = load_benchmark("gsm8k", cfg(data_dir=None), DataConfig())
    assert seen == [("openai/gsm8k", "main", "test")] and problem.gold == "3"


def test_few_shot_gsm8k_prompts_show_worked_examples_with_boxed_answers(tiny_model_dir, tmp_path):
    runner.evaluate_model(str(tiny_model_dir), cfg(limit=1, few_shot=2), DataConfig(), tmp_path / "eval")
    [row] = read_jsonl(tmp_path / "eval" / "gsm8k.jsonl")
    assert row["prompt"].count("<|im_start|>assistant") == 3  # two examples, then the open reply
    assert "The answer is \\boxed{72}." in row["prompt"] and "<<" not in row["prompt"]


def test_few_shot_is_refused_where_no_worked_examples_exist():
    from otr_cli.eval.benchmarks import few_shot_examples

    with pytest.raises(BenchmarkError, match="only for gsm8k"):
        few_shot_examples("svamp", cfg(few_shot=2))


def test_unreachable_hub_says_how_to_evaluate_offline(monkeypatch):
    from otr_cli.data import DataError

    def offline(source, split, subset=None):
        raise DataError("Couldn't reach the Hub")

    monkeypatch.setattr("otr_cli.data.load_records", offline)
    with pytest.raises(BenchmarkError, match=r"cannot load openai_humaneval from the hub.*eval.data_dir=DIR holding "
                                             r"humaneval/HumanEval.jsonl.gz"):
        load_benchmark("humaneval", cfg(data_dir=None), DataConfig())


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_evaluation_in_any_number_of_ranks_equals_one_process(tiny_model_dir, tmp_path, world):
    from otr_cli.eval.sharding import EvalShard

    settings = cfg(benchmarks=["gsm8k", "svamp"], limit=5)
    single = runner.evaluate_model(str(tiny_model_dir), settings, DataConfig(), tmp_path / "single")
    out = tmp_path / "sharded"
    # The ranks in sequence, rank 0 last: it merges after the (here empty) barrier.
    for rank in reversed(range(world)):
        result = runner.evaluate_model(str(tiny_model_dir), settings, DataConfig(), out, shard=EvalShard(rank, world))
        assert result == ({} if rank else single)
    for name in ("gsm8k", "svamp"):
        assert read_jsonl(out / f"{name}.jsonl") == read_jsonl(tmp_path / "single" / f"{name}.jsonl")
    assert not (out / "shards").exists()
    assert len(list(out.glob("generation_cache*.jsonl"))) == min(world, 3)  # 3 batches of 2: one per rank at most


def test_a_missing_rank_shard_is_a_clear_error(tiny_model_dir, tmp_path):
    from otr_cli.eval.sharding import EvalShard

    with pytest.raises(RuntimeError, match=r"gsm8k\.rank1-of-2\.jsonl is missing: rank 1 did not finish gsm8k"):
        runner.evaluate_model(str(tiny_model_dir), cfg(), DataConfig(), tmp_path, shard=EvalShard(0, 2))


def test_every_rank_generates_when_each_benchmark_is_a_single_batch(tiny_model_dir, tmp_path):
    # Issue #25 item 6: three benchmarks of 6 problems in batches of 32 are three batches in all; dealt per
    # benchmark from rank 0, rank 0 generated all 18 completions and ranks 1 and 2 none.
    from otr_cli.eval.sharding import EvalShard

    settings = cfg(benchmarks=["gsm8k", "svamp", "synthetic_arith"], limit=6, batch_size=32)
    single = runner.evaluate_model(str(tiny_model_dir), settings, DataConfig(), tmp_path / "single")
    out = tmp_path / "sharded"
    for rank in reversed(range(3)):  # rank 0 last: it merges after the (here empty) barrier
        result = runner.evaluate_model(str(tiny_model_dir), settings, DataConfig(), out, shard=EvalShard(rank, 3))
        assert result == ({} if rank else single)
    generated = {rank: len(read_jsonl(EvalShard(rank, 3).cache_file(out))) if EvalShard(rank, 3).cache_file(out).is_file()
                 else 0 for rank in range(3)}
    assert generated == {0: 6, 1: 6, 2: 6}
    for name in settings.benchmarks:
        assert read_jsonl(out / f"{name}.jsonl") == read_jsonl(tmp_path / "single" / f"{name}.jsonl")
