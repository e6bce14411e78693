"""The scale path in miniature (issue 14): a random Qwen3-architecture model, 2 gloo ranks, ZeRO-3 made to
release its parameters between forward passes as it does for any model above its reuse threshold.

SmolLM2-sized test models stay gathered under DeepSpeed's defaults, which hides every hang that comes from
ranks running different numbers of forward passes; RELEASE_PARAMETERS brings the 8B behaviour to a few MB.
"""

from __future__ import annotations

import pytest

from helpers import read_jsonl, run_cli, tiny_overrides
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
