"""Study sizes (tiny, default) and the wall-clock estimate they were chosen from.

The estimate uses figures measured on the 2-core development CPU with SmolLM2-135M-Instruct,
one run at a time using both cores: ~100 training tokens/s (`make demo`: 40 steps of 8 x 107
tokens in 341 s), ~0.25 s per decoding step of a generation batch whatever its size up to 50
(greedy, KV cache; a 135M model on 2 cores is bound by per-step overhead, not by the batch), and
the mean rendered length of the training sequences (107 tokens for synthetic_arith, 212 for
GSM8K). Generation is costed at eval.max_new_tokens steps per batch, an upper bound: a batch runs
until its longest answer ends. Two runs at once with one thread each did 1.3x the training
throughput of one two-threaded run and overlap their start-up, hence PARALLEL_SPEEDUP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

SECONDS_PER_TRAIN_TOKEN = 1 / 100.0         # s per sequence token of a training step (fwd + bwd + AdamW)
SECONDS_PER_DECODE_STEP = 0.25              # one greedy token for a whole generation batch
RUN_OVERHEAD_S = 45.0                       # process start, model load, checkpoint writes, final copy, val CE
PARALLEL_SPEEDUP = {1: 1.0, 2: 1.4}         # wall-clock gain of --jobs N on 2 cores (more: no further gain)
TOKENS_PER_SEQUENCE = {"A": 107, "B": 212}  # mean rendered training sequence, tokens

BENCHMARKS = {"A": ("synthetic_arith", "synthetic_arith_ood"), "B": ("gsm8k", "svamp", "mmlu_stem", "humaneval")}


@dataclass(frozen=True)
class Budget:
    """What every run of one study gets, whatever its method.

    steps: optimizer steps; batch: sequences per step (one micro-batch, no accumulation);
    warmup_steps: SFT steps of the warm-up methods before OTR takes over; lr: AdamW peak learning
    rate (constant schedule); seeds: runs per method (seeds 1..N); eval_limit: first N problems of
    each benchmark; eval_max_new_tokens / eval_batch: generation budget and batch; save_steps:
    checkpoint every N steps so an interrupted run resumes there (0: only at the end);
    methods: the methods this size runs in this study (None: all of them).
    """

    steps: int
    batch: int
    warmup_steps: int
    lr: float
    seeds: int
    eval_limit: int
    eval_max_new_tokens: int
    eval_batch: int
    save_steps: int = 0
    methods: Optional[tuple[str, ...]] = None

    def as_dict(self) -> dict:
        return {"steps": self.steps, "batch": self.batch, "warmup_steps": self.warmup_steps, "lr": self.lr,
                "eval_limit": self.eval_limit, "eval_max_new_tokens": self.eval_max_new_tokens}


@dataclass(frozen=True)
class Size:
    """A, B: the two studies; ablations: study A's budget with its own seeds and grid subset."""

    name: str
    a: Budget
    b: Budget
    ablation_seeds: int
    # Axis -> values to run (the default point is study A's run of the ablated method).
    ablation_grid: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def budget(self, study: str) -> Budget:
        return self.b if study == "B" else self.a


SIZES: dict[str, Size] = {
    # A smoke run of every code path: 12 min 13 s measured on 2 cores with --jobs 2 (17 min 36 s one at a time).
    "tiny": Size(
        "tiny",
        a=Budget(steps=4, batch=4, warmup_steps=2, lr=1e-4, seeds=1, eval_limit=6, eval_max_new_tokens=96,
                 eval_batch=12),
        b=Budget(steps=2, batch=4, warmup_steps=1, lr=2e-5, seeds=1, eval_limit=3, eval_max_new_tokens=192,
                 eval_batch=12, methods=("sft", "warmup_otr")),
        ablation_seeds=1,
        ablation_grid={"k": (8,)},
    ),
    # About 2 hours on 2 cores with --jobs 2: study A carries the seeds (where SFT and OTR differ
    # measurably); study B (the costly one: long GSM8K sequences and answers) and the ablations one
    # seed each, study B with the three methods that answer the headline question.
    "default": Size(
        "default",
        a=Budget(steps=24, batch=8, warmup_steps=12, lr=1e-4, seeds=3, eval_limit=50, eval_max_new_tokens=96,
                 eval_batch=50, save_steps=12),
        b=Budget(steps=16, batch=4, warmup_steps=8, lr=2e-5, seeds=1, eval_limit=25, eval_max_new_tokens=256,
                 eval_batch=25, save_steps=8, methods=("sft", "otr", "warmup_otr")),
        ablation_seeds=1,
        ablation_grid={"k": (1, 8, 64, 256), "temperature": (1.0, 1.3), "beta": (0.0, -0.1, -0.5)},
    ),
}
SIZE_NAMES = (*SIZES, "paper")


def train_seconds(study: str, budget: Budget) -> float:
    """Estimated wall-clock seconds of one `otr train` run of `study` (training + final eval)."""
    training = budget.steps * budget.batch * TOKENS_PER_SEQUENCE[study] * SECONDS_PER_TRAIN_TOKEN
    return training + eval_seconds(study, budget) + RUN_OVERHEAD_S


def eval_seconds(study: str, budget: Budget) -> float:
    """Estimated seconds of generation for one model on all of `study`'s benchmarks."""
    batches = -(-budget.eval_limit // budget.eval_batch)
    return len(BENCHMARKS[study]) * batches * budget.eval_max_new_tokens * SECONDS_PER_DECODE_STEP


def wall_seconds(run_seconds: float, jobs: int) -> float:
    """Wall-clock estimate of runs totalling `run_seconds` (one at a time) executed `jobs` at once."""
    return run_seconds / PARALLEL_SPEEDUP.get(jobs, max(PARALLEL_SPEEDUP.values()))


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"
