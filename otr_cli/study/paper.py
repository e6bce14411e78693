"""`--size paper`: the study at the paper's scale, printed as SLURM sweeps (never run here).

Qwen3-8B on NuminaMath-CoT (recipe qwen8b_math), evaluated with eval=paper (GSM8K, MATH-500,
HumanEval, MMLU-STEM). Each method is one `otr train -m ... launcher=slurm` job array whose
points are the seeds; each ablation axis is one array over its values. All methods get the same
optimizer steps, so the budget is fixed in steps rather than epochs.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from otr_cli.study.methods import ABLATION_GRID, METHODS, OTR_DEFAULTS, StudyError
from otr_cli.study.plan import display_path


@dataclass(frozen=True)
class PaperBudget:
    """One point = nodes x gpus_per_node ranks; global batch = micro_batch x grad_accum x ranks."""

    recipe: str = "qwen8b_math"
    nodes: int = 1
    gpus_per_node: int = 8
    micro_batch: int = 4        # the recipe's trainer.micro_batch_size
    grad_accum: int = 8         # the recipe's trainer.grad_accum
    examples: int = 100_000     # the recipe's data.max_examples: one epoch of them
    timeout_min: int = 1440
    seeds: int = 3
    ablation_seeds: int = 1

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.nodes * self.gpus_per_node

    @property
    def steps(self) -> int:
        return self.examples // self.global_batch

    @property
    def warmup_steps(self) -> int:
        return self.steps // 2


def paper_commands(methods: list[str], only: Optional[str], seeds: Optional[int], ablation_method: str,
                   partition: str, cache_root: Path, model: Optional[str] = None,
                   budget: PaperBudget = PaperBudget()) -> list[str]:
    """Comment lines (starting with #) and commands, in the order to submit them."""
    if only == "A":
        raise StudyError("--size paper --only A: the synthetic study A has no paper-scale version; the paper's "
                         "comparison is study B (recipe qwen8b_math) and its ablations (--only B or ablations)")
    root = cache_root / "paper"
    launcher = ["-m", f"recipe={budget.recipe}", "launcher=slurm", f"launcher.partition={partition}",
                f"launcher.nodes={budget.nodes}", f"launcher.gpus_per_node={budget.gpus_per_node}",
                f"launcher.tasks_per_node={budget.gpus_per_node}", f"launcher.timeout_min={budget.timeout_min}"]
    model_args = [f"model.name_or_path={model}"] if model else []
    common = [*model_args, f"trainer.max_steps={budget.steps}", "eval=paper"]
    main_seeds = ",".join(str(s) for s in range(1, (seeds or budget.seeds) + 1))
    lines = [f"# Paper scale: recipe {budget.recipe}, {budget.nodes} node(s) x {budget.gpus_per_node} GPUs per run, "
             f"global batch {budget.global_batch}, {budget.steps} steps (one epoch of {budget.examples} examples), "
             f"SFT warm-up {budget.warmup_steps} steps for the warm-up methods.",
             "# Submit from a login node; every command is one SLURM job array (see docs/slurm.md)."]
    if only in (None, "B"):
        lines.append("# Study B: one array per method, one point per seed.")
        for name in methods:
            args = [*launcher, *common, *METHODS[name].overrides(budget.warmup_steps), f"seed={main_seeds}",
                    f"hydra.sweep.dir={display_path(root / 'B' / name)}"]
            lines.append(_otr("train", args))
        lines.append("# The base model's row (on a GPU node).")
        base_model = model_args or ["model=qwen3_8b"]
        lines.append(_otr("eval", [*base_model, "data=numina_math_cot", "eval=paper",
                                   "eval.batch_size=64", f"run.output_dir={display_path(root / 'B' / 'base')}"]))
    if only in (None, "ablations"):
        ablation_seeds = ",".join(str(s) for s in range(1, (seeds or budget.ablation_seeds) + 1))
        lines.append(f"# Ablations of {ablation_method}: one array per axis (its default point is study B's run).")
        for axis, values in ABLATION_GRID.items():
            others = ",".join(str(v) for v in values if v != OTR_DEFAULTS[axis])
            overrides = [o for o in METHODS[ablation_method].overrides(budget.warmup_steps)
                         if not o.startswith(f"loss.{axis}=")]
            args = [*launcher, *common, *overrides, f"loss.{axis}={others}", f"seed={ablation_seeds}",
                    f"hydra.sweep.dir={display_path(root / 'ablations' / ablation_method / axis)}"]
            lines.append(_otr("train", args))
    return lines


def _otr(command: str, args: list[str]) -> str:
    return " ".join(["otr", command, *(shlex.quote(a) for a in args)])
