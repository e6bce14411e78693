"""The 8-64 rank path in miniature on 4 gloo ranks (issue 25): a random Qwen3-architecture model under ZeRO-3
releasing its parameters, packed micro-batches filled to a token budget, a first tokenization that one process
could not finish within the collective timeout, periodic benchmarks dealt over every rank, kill -9 of every rank
and a resume, a resume onto 2 ranks, and a SLURM job of 4 tasks preempted and requeued.

About 20 minutes on 2 cores: `make rehearsal` runs it, `make test` does not (docs/distributed.md).
"""

from __future__ import annotations

import shutil

import pytest

from helpers import SHARED_DATA, read_jsonl, tiny_overrides
from test_rehearsal import RELEASE_PARAMETERS, kill_all_once, preempt_and_requeue_on_slurm, run_ranks, same_run

pytestmark = [pytest.mark.slow, pytest.mark.rehearsal4]

WORLD = 4
# Every collective of these runs times out after 15 s; one process needs about 30 s (on a quiet 2-core
# machine) to tokenize the training set below, so a first tokenization by rank 0 alone would time out.
SHORT_TIMEOUT = ["launcher.dist_timeout_min=0.25"]
COPIES = 8  # GSM8K's training records, 8 times over (59,784 records; 4 copies took 14.8 s in one process)


@pytest.fixture(scope="module")
def training_file(tmp_path_factory):
    """GSM8K train COPIES times, each copy's questions marked so that no two records are the same."""
    import json

    path = tmp_path_factory.mktemp("data") / "gsm8k_copies.jsonl"
    records = read_jsonl(SHARED_DATA / "gsm8k" / "train.jsonl")
    with path.open("w") as handle:
        for copy in range(COPIES):
            for record in records:
                handle.write(json.dumps({**record, "question": f"({copy}) {record['question']}"}) + "\n")
    return path


def four_rank_path(model_dir, out, training_file, *extra: str) -> list[str]:
    overrides = [o for o in tiny_overrides(model_dir, out)
                 if o != "eval=none"
                 and not o.startswith(("data.synthetic", "data.max_length", "trainer.micro_batch_size"))]
    return overrides + [
        f"data.source={training_file}", "data.validation_size=6", "data.max_length=256",
        "data.packing=true", "trainer.max_tokens_per_batch=600",
        "loss=otr", "loss.k=8", "deepspeed=zero3", *RELEASE_PARAMETERS, *SHORT_TIMEOUT,
        "trainer.max_steps=4", "trainer.save_steps=2", "trainer.eval_steps=2",
        # 3 benchmarks of 4 problems in batches of 2: 6 batches, dealt so that each of the 4 ranks generates.
        "eval=quick", "eval.benchmarks=[gsm8k,svamp,mmlu_stem]", f"eval.data_dir={SHARED_DATA}", "eval.limit=4",
        "eval.batch_size=2", "eval.max_new_tokens=8", "eval.before_training=false", "eval.after_warmup=false",
        "eval.every_steps=2", "eval.every_steps_limit=4", *extra]


@pytest.fixture(scope="module")
def reference(tiny_qwen3_model_dir, training_file, tmp_path_factory):
    """The 4-rank path once, uninterrupted, its first start tokenizing GSM8K (a cache miss)."""
    out = tmp_path_factory.mktemp("rehearsal4") / "uninterrupted"
    cache = out.parent / "tokenized"
    run_ranks(["train", *four_rank_path(tiny_qwen3_model_dir, out, training_file, f"data.cache_dir={cache}")],
              out.parent / "logs", world=WORLD, timeout=900)
    return out


def _generated_per_rank(directory) -> list[int]:
    names = ["generation_cache.jsonl"] + [f"generation_cache.rank{r}.jsonl" for r in range(1, WORLD)]
    return [len(read_jsonl(directory / name)) if (directory / name).is_file() else 0 for name in names]


def test_four_ranks_tokenize_past_the_collective_timeout_and_every_rank_generates(reference):
    report = read_jsonl(reference / "metrics.jsonl")
    assert [r["step"] for r in report if "loss" in r] == [1, 2, 3, 4]
    assert all(r["padding_frac"] == 0.0 for r in report if "loss" in r), "packed rows without padding"
    assert [r["step"] for r in report if "eval/gsm8k" in r] == [2]
    for evaluation in ("step-2", "final"):
        generated = _generated_per_rank(reference / "eval" / evaluation)
        assert all(count > 0 for count in generated) and sum(generated) == 12, (evaluation, generated)
    data_report = (reference / "data_report.json").read_text()
    assert '"cache": "miss"' in data_report


def test_kill_9_of_four_ranks_then_resume_on_four_and_on_two(reference, tiny_qwen3_model_dir, training_file, tmp_path):
    out = tmp_path / "killed"
    args = ["train", *four_rank_path(tiny_qwen3_model_dir, out, training_file)]
    step_2_cached = lambda: any((out / "eval" / "step-2").glob("generation_cache*.jsonl"))  # noqa: E731
    kill_all_once(args, tmp_path / "logs", WORLD, step_2_cached)
    assert not (out / "final").exists(), "the run finished before it was killed"
    onto_two = tmp_path / "onto-two"
    shutil.copytree(out, onto_two, symlinks=True)

    run_ranks(args, tmp_path / "resume-logs", world=WORLD, timeout=900)
    same_run(reference, out)

    # The same checkpoint on 2 ranks with twice the accumulation: the same global batches. OTR's draws are keyed
    # on the rank, so steps 3-4 draw other tokens: the run continues, it does not repeat the 4-rank one.
    run_ranks(["train", *four_rank_path(tiny_qwen3_model_dir, onto_two, training_file, "trainer.grad_accum=2")],
              tmp_path / "two-logs", world=2, timeout=900)
    records = read_jsonl(onto_two / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    log = (tmp_path / "two-logs" / "rank0.log").read_text()
    assert "Resumed from" in log and "checkpoint-2" in log
    final_val = [r["val_ce"] for r in records if "val_ce" in r][-1]
    reference_val = [r["val_ce"] for r in read_jsonl(reference / "metrics.jsonl") if "val_ce" in r][-1]
    assert final_val == pytest.approx(reference_val, rel=0.05)


@pytest.mark.slurm
def test_a_four_task_slurm_job_preempted_requeues_itself_and_ends_like_the_uninterrupted_run(
        reference, tiny_qwen3_model_dir, training_file, tmp_path):
    from slurm_cluster import SlurmCluster, slurm_available

    reason = slurm_available()
    if reason:
        pytest.skip(f"no SLURM here: {reason}")
    cluster = SlurmCluster(tmp_path / "cluster", cpus=WORLD)  # 4 tasks on this 2-core machine
    cluster.start()
    try:
        sweep = tmp_path / "sweep"
        overrides = [o for o in four_rank_path(tiny_qwen3_model_dir, sweep, training_file)
                     if not o.startswith("run.output_dir=")]
        preempt_and_requeue_on_slurm(overrides, sweep, tmp_path, cluster.env, tasks=WORLD)
        same_run(reference, sweep / "0")
    finally:
        cluster.stop()
