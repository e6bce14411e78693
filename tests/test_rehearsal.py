"""The scale path in miniature (issue 14): a random Qwen3-architecture model, 2 gloo ranks, ZeRO-3 made to
release its parameters between forward passes as it does for any model above its reuse threshold.

SmolLM2-sized test models stay gathered under DeepSpeed's defaults, which hides every hang that comes from
ranks running different numbers of forward passes; RELEASE_PARAMETERS brings the 8B behaviour to a few MB.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
from transformers import AutoModelForCausalLM

from helpers import REPO, SHARED_DATA, read_jsonl, run_cli, subprocess_env, tiny_overrides
from otr_cli.cli import main
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
    main(["train", *tiny_overrides(tiny_qwen3_model_dir, tmp_path / "one", *common, "trainer.micro_batch_size=4")])
    two = [r["val_ce"] for r in read_jsonl(tmp_path / "two" / "metrics.jsonl") if "val_ce" in r]
    one = [r["val_ce"] for r in read_jsonl(tmp_path / "one" / "metrics.jsonl") if "val_ce" in r]
    assert len(two) == len(one) == 3  # steps 1 and 2, and the final one
    # The same weights (same global batches, sft is deterministic) and the same 5 examples: only the
    # summation order differs (per-rank sums, then an all-reduce), float32 rounding ~1e-7 relative.
    assert two == pytest.approx(one, rel=1e-5)


def scale_path(model_dir, out, *extra: str) -> list[str]:
    """One run of the whole path in miniature: OTR under ZeRO-3 releasing its parameters, an uneven
    validation set (5 in batches of 2), checkpoints every 2 steps, and benchmarks every 2 steps and at
    the end on 7 GSM8K problems in batches of 2 (4 batches, 2 on each rank, the last one short)."""
    overrides = [o for o in tiny_overrides(model_dir, out) if o != "eval=none"]
    return overrides + ["loss=otr", "loss.k=8", "deepspeed=zero3", *RELEASE_PARAMETERS, *SHORT_TIMEOUT,
                        "trainer.micro_batch_size=2", "trainer.max_steps=4", "trainer.save_steps=2",
                        "data.synthetic.num_validation=5", "trainer.eval_steps=2",
                        "eval=quick", "eval.benchmarks=[gsm8k]", f"eval.data_dir={SHARED_DATA}", "eval.limit=7",
                        "eval.batch_size=2", "eval.max_new_tokens=12", "eval.before_training=false",
                        "eval.after_warmup=false", "eval.every_steps=2", "eval.every_steps_limit=7", *extra]


@pytest.fixture(scope="module")
def uninterrupted(tiny_qwen3_model_dir, tmp_path_factory):
    """The scale path run once on 2 ranks without interruption: the reference of the tests below."""
    out = tmp_path_factory.mktemp("rehearsal") / "uninterrupted"
    run_ranks(["train", *scale_path(tiny_qwen3_model_dir, out)], out.parent / "logs")
    return out


def same_run(reference, resumed) -> None:
    """Two runs of the scale path logged the same steps, losses, validation and benchmark scores."""
    left, right = read_jsonl(reference / "metrics.jsonl"), read_jsonl(resumed / "metrics.jsonl")
    assert [sorted(r) for r in left] == [sorted(r) for r in right]
    for a, b in zip(left, right):
        for key in ("loss", "ce", "match_rate", "val_ce", "eval/gsm8k"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["step"], key)
    assert read_jsonl(reference / "eval" / "final" / "gsm8k.jsonl") == read_jsonl(resumed / "eval" / "final" / "gsm8k.jsonl")


def test_evaluation_is_sharded_over_the_ranks_and_equals_one_process(uninterrupted, tmp_path):
    two = uninterrupted
    # Each rank generated its own 2 batches (4 prompts on one rank, 3 on the other: the deal balances tokens),
    # at step 2 (from a temporary export: ZeRO-3 holds a slice of each parameter) and at the end (from the
    # final model).
    for evaluation in ("step-2", "final"):
        directory = two / "eval" / evaluation
        generated = [len(read_jsonl(directory / name))
                     for name in ("generation_cache.jsonl", "generation_cache.rank1.jsonl")]
        assert sorted(generated) == [3, 4], (evaluation, generated)
        assert not (directory / "model").exists() and not (directory / "shards").exists()
    assert [r["step"] for r in read_jsonl(two / "metrics.jsonl") if "eval/gsm8k" in r] == [2]
    assert [r["step"] for r in read_jsonl(two / "metrics.jsonl") if "val_ce" in r] == [2, 4, 4]

    # The same problems with one process on the final model: the same batches, so the same completions.
    evaluate = ["eval", f"model={two / 'final'}", "eval=quick", "eval.benchmarks=[gsm8k]", f"eval.data_dir={SHARED_DATA}",
                "eval.limit=7", "eval.batch_size=2", "eval.max_new_tokens=12"]
    main([*evaluate, f"run.output_dir={tmp_path / 'one'}"])  # in this process: one interpreter start less
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
    result = run_cli([*evaluate, f"run.output_dir={tmp_path / 'resumed'}"])
    assert "generating" not in result.stdout + result.stderr
    assert read_jsonl(resumed / "gsm8k.jsonl") == single


@pytest.mark.faults
def test_kill_9_of_both_ranks_during_an_evaluation_and_resume_ends_like_the_uninterrupted_run(uninterrupted, tiny_qwen3_model_dir,
                                                                        tmp_path):
    out = tmp_path / "killed"
    args = ["train", *scale_path(tiny_qwen3_model_dir, out)]
    # Killed in the evaluation after the step-2 checkpoint, once rank 0 has cached its first batch: the
    # resumed run must finish that evaluation (from the cache) before it trains on.
    kill_all_once(args, tmp_path / "logs", 2, lambda: (out / "eval" / "step-2" / "generation_cache.jsonl").is_file())
    assert not (out / "final").exists(), "the run finished before it was killed"
    run_ranks(args, tmp_path / "resume-logs")
    same_run(uninterrupted, out)


def kill_all_once(args: list[str], log_dir, world: int, ready, timeout: float = 600) -> None:
    """`otr ARGS` on `world` ranks, every one of them killed with SIGKILL as soon as `ready()` is true."""
    log_dir.mkdir(parents=True)
    processes = start_ranks(args, log_dir, world=world)
    try:
        deadline = time.time() + timeout
        while not ready():
            assert all(p.poll() is None for p in processes) and time.time() < deadline, \
                (log_dir / "rank0.log").read_text()[-3000:]
            time.sleep(0.05)
    finally:
        for process in processes:
            process.send_signal(signal.SIGKILL)
            process.wait()


def preempt_and_requeue_on_slurm(overrides: list[str], sweep, tmp_path, env: dict[str, str], tasks: int) -> None:
    """`otr train -m OVERRIDES launcher=slurm` as one job of `tasks` tasks; once it has logged a step, SLURM's
    warning signal (what --signal=USR1@N sends before the time limit) to every task. The job must save,
    requeue itself, resume and finish."""
    from test_slurm import job_logs, submitted_job_ids

    command = [sys.executable, "-m", "otr_cli.cli", "train", "-m", *overrides, "launcher=slurm",
               f"hydra.sweep.dir={sweep}", f"launcher.tasks_per_node={tasks}"]
    metrics = sweep / "0" / "metrics.jsonl"
    with (tmp_path / "submit.log").open("w") as log:
        process = subprocess.Popen(command, cwd=tmp_path, env=subprocess_env() | env, stdout=log,
                                   stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 600
            while not (metrics.is_file() and any("loss" in r for r in read_jsonl(metrics))):
                assert process.poll() is None and time.time() < deadline, \
                    f"{(tmp_path / 'submit.log').read_text()[-3000:]}\n{job_logs(tmp_path)}"
                time.sleep(0.1)
            [job] = submitted_job_ids(sweep)
            subprocess.run(["scancel", "--signal=USR1", job], env=subprocess_env() | env, check=True)
            process.wait(timeout=900)
        finally:
            process.kill()
    assert process.returncode == 0, f"{(tmp_path / 'submit.log').read_text()[-3000:]}\n{job_logs(tmp_path)}"
    logs = "".join(path.read_text() for path in tmp_path.rglob(".submitit/*/*_log.*"))  # whole, not tails
    for line in ("Preempted at step", "requeued", "Resumed from"):
        assert line in logs, f"no {line!r} in the job's logs:\n{job_logs(tmp_path)}"


@pytest.mark.faults
@pytest.mark.slurm
def test_two_task_slurm_job_preempted_requeues_itself_and_ends_like_the_uninterrupted_run(
        uninterrupted, slurm, tiny_qwen3_model_dir, tmp_path):
    sweep = tmp_path / "sweep"
    overrides = [o for o in scale_path(tiny_qwen3_model_dir, sweep) if not o.startswith("run.output_dir=")]
    preempt_and_requeue_on_slurm(overrides, sweep, tmp_path, slurm.env, tasks=2)
    same_run(uninterrupted, sweep / "0")


@pytest.mark.faults
def test_a_rank_with_a_stale_listing_of_checkpoints_evaluates_the_same_checkpoint_as_the_others(
        tiny_qwen3_model_dir, tmp_path):
    # Rank 1 never sees the step-2 checkpoint in its listing (NFS attribute caching): it must still load
    # the model from step-2 like rank 0, not join a gather alone (a hang under ZeRO-3) nor take an older one.
    out = tmp_path / "stale"
    (tmp_path / "logs").mkdir()
    processes = start_ranks(["train", *scale_path(tiny_qwen3_model_dir, out, "trainer.max_steps=3",
                                                  "trainer.eval_steps=0")],
                            tmp_path / "logs", extra_env={"OTR_STALE_RANK": "1"},
                            script=str(REPO / "tests" / "stale_listing.py"))
    codes = wait_all(processes, 400)
    for process in processes:
        if process.poll() is None:
            process.kill()
    logs = "\n".join(f"--- rank {r} ---\n" + (tmp_path / "logs" / f"rank{r}.log").read_text()[-3000:] for r in (0, 1))
    assert codes == [0, 0], f"exit codes {codes}:\n{logs}"
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "eval/gsm8k" in r] == [2]
    assert not (out / "eval" / "step-2" / "model").exists()


def test_without_an_export_in_each_checkpoint_zero3_evaluations_and_final_still_get_one(tiny_qwen3_model_dir, tmp_path):
    # trainer.export_every_save=false: the step-2 evaluation exports the model temporarily (a collective every
    # rank joins), and final/ is exported; the checkpoints hold DeepSpeed's state only.
    out = tmp_path / "lean"
    run_ranks(["train", *scale_path(tiny_qwen3_model_dir, out, "trainer.max_steps=3", "trainer.eval_steps=0",
                                    "trainer.export_every_save=false")], tmp_path / "logs")
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "eval/gsm8k" in r] == [2]
    assert not (out / "eval" / "step-2" / "model").exists()
    for step in (2, 3):
        assert not (out / "checkpoints" / f"checkpoint-{step}" / "model.safetensors").exists()
    assert read_jsonl(out / "eval" / "final" / "gsm8k.jsonl")
    AutoModelForCausalLM.from_pretrained(out / "final")
    log = " ".join((tmp_path / "logs" / "rank0.log").read_text().split())  # rich wraps long lines
    assert "checkpoint-2 saved in" in log and "the other ranks waited" in log
