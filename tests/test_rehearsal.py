"""The scale path in miniature (issue 14): a random Qwen3-architecture model, 2 gloo ranks, ZeRO-3 made to
release its parameters between forward passes as it does for any model above its reuse threshold.

SmolLM2-sized test models stay gathered under DeepSpeed's defaults, which hides every hang that comes from
ranks running different numbers of forward passes; RELEASE_PARAMETERS brings the 8B behaviour to a few MB.
"""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import SHARED_DATA, read_jsonl, run_cli, tiny_overrides
from ranks import start_ranks, wait_all

pytestmark = pytest.mark.slow

RELEASE_PARAMETERS = ["+deepspeed.extra.zero_optimization.stage3_max_live_parameters=0",
                      "+deepspeed.extra.zero_optimization.stage3_max_reuse_distance=0",
                      "+deepspeed.extra.zero_optimization.stage3_param_persistence_threshold=0",
                      "+deepspeed.extra.zero_optimization.stage3_prefetch_bucket_size=0"]
# A hang fails in 30 s instead of the default 30 min.
SHORT_TIMEOUT = ["launcher.dist_timeout_min=0.5"]


def run_ranks(args: list[str], log_dir, world: int = 2, timeout: float = 300) -> None:
    """`otr ARGS` on `world` ranks; fails with every rank's log tail when one fails or hangs."""
    log_dir.mkdir(parents=True, exist_ok=True)
    processes = start_ranks(args, log_dir, world=world)
    codes = wait_all(processes, timeout)
    for process in processes:
        if process.poll() is None:
            process.kill()
    if codes != [0] * world:
        logs = "\n".join(f"--- rank {r} ---\n" + (log_dir / f"rank{r}.log").read_text()[-3000:] for r in range(world))
        raise AssertionError(f"exit codes {codes}:\n{logs}")


def test_uneven_validation_set_under_zero3_finishes_and_equals_one_process(tiny_qwen3_model_dir, tmp_path):
    # 5 validation examples in micro-batches of 2: rank 0 gets 2 batches, rank 1 one (1 example left over).
    common = ["loss=sft", "data.synthetic.num_validation=5", "trainer.micro_batch_size=2", "trainer.max_steps=2",
              "trainer.eval_steps=1"]
    run_ranks(["train", *tiny_overrides(tiny_qwen3_model_dir, tmp_path / "two", *common, "deepspeed=zero3",
                                        *RELEASE_PARAMETERS, *SHORT_TIMEOUT)], tmp_path / "logs")
    run_cli(["train", *tiny_overrides(tiny_qwen3_model_dir, tmp_path / "one", *common, "trainer.micro_batch_size=4")])
    two = [r["val_ce"] for r in read_jsonl(tmp_path / "two" / "metrics.jsonl") if "val_ce" in r]
    one = [r["val_ce"] for r in read_jsonl(tmp_path / "one" / "metrics.jsonl") if "val_ce" in r]
    assert len(two) == len(one) == 3  # steps 1 and 2, and the final one
    # The same weights (same global batches, sft is deterministic) and the same 5 examples: only the
    # summation order differs (per-rank sums, then an all-reduce), float32 rounding ~1e-7 relative.
    assert two == pytest.approx(one, rel=1e-5)


def with_eval(model_dir, out, *extra: str) -> list[str]:
    """tiny_overrides with an evaluation of 7 GSM8K problems in batches of 2: 4 batches, dealt 2 and 2
    over 2 ranks, the last one short."""
    overrides = [o for o in tiny_overrides(model_dir, out) if o != "eval=none"]
    return overrides + ["eval=quick", "eval.benchmarks=[gsm8k]", f"eval.data_dir={SHARED_DATA}", "eval.limit=7", "eval.batch_size=2",
                        "eval.max_new_tokens=12", "eval.before_training=false", "eval.after_warmup=false", *extra]


def test_evaluation_is_sharded_over_the_ranks_and_equals_one_process(tiny_qwen3_model_dir, tmp_path):
    two = tmp_path / "two"
    run_ranks(["train", *with_eval(tiny_qwen3_model_dir, two, "loss=sft", "deepspeed=zero3", "trainer.max_steps=2",
                                   "trainer.micro_batch_size=2", "eval.every_steps=1", "eval.every_steps_limit=7",
                                   *RELEASE_PARAMETERS, *SHORT_TIMEOUT)], tmp_path / "logs")
    # Each rank generated its own 2 batches (4 prompts on rank 0, 3 on rank 1), at step 1 (from a temporary
    # export: ZeRO-3 holds a slice of each parameter) and at the end (from the final model).
    for evaluation in ("step-1", "final"):
        directory = two / "eval" / evaluation
        assert len(read_jsonl(directory / "generation_cache.jsonl")) == 4
        assert len(read_jsonl(directory / "generation_cache.rank1.jsonl")) == 3
        assert not (directory / "model").exists() and not (directory / "shards").exists()
    assert any("eval/gsm8k" in r for r in read_jsonl(two / "metrics.jsonl"))

    # The same problems with one process on the final model: the same batches, so the same completions.
    run_cli(["eval", f"model={two / 'final'}", "eval=quick", "eval.benchmarks=[gsm8k]", f"eval.data_dir={SHARED_DATA}", "eval.limit=7",
             "eval.batch_size=2", "eval.max_new_tokens=12", f"run.output_dir={tmp_path / 'one'}"])
    sharded = read_jsonl(two / "eval" / "final" / "gsm8k.jsonl")
    single = read_jsonl(tmp_path / "one" / "eval" / "gsm8k.jsonl")
    assert [r["id"] for r in sharded] == [r["id"] for r in single]
    assert [r["completion"] for r in sharded] == [r["completion"] for r in single]
    assert json.loads((two / "eval" / "final" / "summary.json").read_text()) == json.loads(
        (tmp_path / "one" / "eval" / "summary.json").read_text())

    # An evaluation resumed with another number of ranks reuses every rank's completions: nothing to generate.
    resumed = tmp_path / "resumed" / "eval"
    resumed.mkdir(parents=True)
    for cache in (two / "eval" / "final").glob("generation_cache*.jsonl"):
        shutil.copy(cache, resumed / cache.name)
    result = run_cli(["eval", f"model={two / 'final'}", "eval=quick", "eval.benchmarks=[gsm8k]",
                      f"eval.data_dir={SHARED_DATA}", "eval.limit=7", "eval.batch_size=2", "eval.max_new_tokens=12",
                      f"run.output_dir={tmp_path / 'resumed'}"])
    assert "generating" not in result.stdout + result.stderr
    assert read_jsonl(resumed / "gsm8k.jsonl") == single
