"""Study sizes (tiny, default) and the wall-clock estimate they were chosen from.

The estimate uses figures measured on the 2-core development CPU with SmolLM2-135M-Instruct
(docs/benchmarks/): ~6.5 s per optimizer step of 8 sequences of ~110 tokens (bench_train),
~150 generated tokens/s at generation batch 16 (bench_eval), and the mean rendered length of
the training sequences (107 tokens for synthetic_arith, 212 for GSM8K). Generation is costed
at eval.max_new_tokens per problem, an upper bound: a batch runs until its longest answer ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

SECONDS_PER_TRAIN_TOKEN = 6.5 / (8 * 110)   # s per sequence token of a training step (fwd + bwd + AdamW)
GENERATED_TOKENS_PER_S = 150.0              # greedy generation at batch 16
RUN_OVERHEAD_S = 40.0                       # process start, model load, checkpoint writes, final copy, val CE
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
    # A smoke run of every code path: ~10 minutes on 2 cores (see estimate_seconds).
    "tiny": Size(
        "tiny",
        a=Budget(steps=4, batch=4, warmup_steps=2, lr=1e-4, seeds=1, eval_limit=6, eval_max_new_tokens=96,
                 eval_batch=12),
        b=Budget(steps=2, batch=4, warmup_steps=1, lr=2e-5, seeds=1, eval_limit=3, eval_max_new_tokens=192,
                 eval_batch=12, methods=("sft", "warmup_otr")),
        ablation_seeds=1,
        ablation_grid={"k": (8,)},
    ),
    # About 3 hours on 2 cores: study A carries the seeds (where SFT and OTR differ measurably),
    # study B and the ablations one seed each.
    "default": Size(
        "default",
        a=Budget(steps=32, batch=8, warmup_steps=16, lr=1e-4, seeds=3, eval_limit=50, eval_max_new_tokens=96,
                 eval_batch=25, save_steps=16),
        b=Budget(steps=20, batch=8, warmup_steps=10, lr=2e-5, seeds=1, eval_limit=25, eval_max_new_tokens=256,
                 eval_batch=25, save_steps=10),
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
    return len(BENCHMARKS[study]) * budget.eval_limit * budget.eval_max_new_tokens / GENERATED_TOKENS_PER_S


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"
