"""The study as a list of runs, each one `otr train` (or `otr eval` for the base model) command.

A run's directory is a pure function of (size, study, method, ablation, seed) under the cache
root, so a study can be stopped, resumed and extended a piece at a time:

    <cache>/<size>/A/<method>/seed-<n>                    study A: synthetic_arith
    <cache>/<size>/B/<method>/seed-<n>                    study B: GSM8K
    <cache>/<size>/<A|B>/base                             the untrained model (`otr eval`)
    <cache>/<size>/ablations/<method>/<axis>_<value>/seed-<n>

Commands run from the repository root; paths in them are relative to it where possible.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from otr_cli.study.methods import ABLATION_METHODS, METHODS, OTR_DEFAULTS, StudyError
from otr_cli.study.sizes import BENCHMARKS, RUN_OVERHEAD_S, Size, eval_seconds, train_seconds

REPO = Path(__file__).resolve().parents[2]
STUDIES = ("A", "B", "ablations")
# Override prefixes that also apply to the base model's `otr eval` (its config has no other groups).
EVAL_KEYS = ("model.", "data.", "eval.")


@dataclass(frozen=True)
class Run:
    """One cached run. argv: the `otr` arguments (argv[0] is the subcommand, `train` or `eval`)."""

    study: str
    method: str                 # a METHODS name, or "base"
    seed: Optional[int]         # None for the base model's evaluation
    ablation: Optional[tuple[str, float]]
    argv: tuple[str, ...]
    run_dir: Path
    estimate_s: float
    # Budget.as_dict() of the study whose data and evaluation it uses (+ extra_overrides); not hashed.
    budget: Optional[dict] = field(default=None, hash=False)

    @property
    def key(self) -> str:
        """File-name-safe identity, e.g. A-sft-seed1, ablations-warmup_otr-k_8-seed1, B-base."""
        parts = [self.study, self.method]
        if self.ablation:
            parts.append(ablation_label(self.ablation))
        if self.seed is not None:
            parts.append(f"seed{self.seed}")
        return "-".join(parts)

    @property
    def is_eval_only(self) -> bool:
        return self.argv[0] == "eval"

    def command(self) -> str:
        """The command as a user types it (shell-quoted)."""
        import shlex

        return " ".join(["otr", *(shlex.quote(a) for a in self.argv)])


@dataclass(frozen=True)
class StudyOptions:
    """What scripts/reproduce.py was asked for (validated by build_plan)."""

    size: Size
    only: Optional[str] = None            # A, B, ablations or None (all)
    methods: Optional[list[str]] = None   # None: the size's methods
    seeds: Optional[int] = None           # None: the size's seeds per study
    ablation_method: str = "warmup_otr"
    cache_root: Path = REPO / "outputs" / "study"
    model: Optional[str] = None           # None: the recipes' SmolLM2-135M-Instruct
    data_dir: Path = REPO / "data"       # a local copy laid out as in docs/eval.md
    extra_overrides: tuple[str, ...] = ()


def display_path(path: Path) -> str:
    """`path` relative to the repository (or its parent, as ../) when inside them, else absolute."""
    path = Path(os.path.abspath(path))
    for base, prefix in ((REPO, ""), (REPO.parent, "../")):
        try:
            return prefix + str(path.relative_to(base))
        except ValueError:
            continue
    return str(path)


def ablation_label(ablation: tuple[str, float]) -> str:
    axis, value = ablation
    return f"{axis}_{int(value) if axis == 'k' else float(value)}"


def build_plan(options: StudyOptions) -> list[Run]:
    """Every run the options ask for, in execution order, without duplicates."""
    _check(options)
    studies = [options.only] if options.only else list(STUDIES)
    runs: dict[str, Run] = {}
    for study in studies:
        for run in (_ablation_runs(options) if study == "ablations" else _study_runs(options, study)):
            runs.setdefault(run.key, run)
    return list(runs.values())


def estimate_seconds(runs: list[Run]) -> float:
    return sum(run.estimate_s for run in runs)


def _check(options: StudyOptions) -> None:
    if options.only is not None and options.only not in STUDIES:
        raise StudyError(f"--only {options.only!r}: choose one of {', '.join(STUDIES)}")
    if options.seeds is not None and options.seeds < 1:
        raise StudyError(f"--seeds {options.seeds}: needs at least 1 seed")
    if options.ablation_method not in ABLATION_METHODS:
        raise StudyError(f"--ablation-method {options.ablation_method!r}: choose one of {', '.join(ABLATION_METHODS)} "
                         f"(K only matters for the sampled objective)")
    for override in options.extra_overrides:
        if "=" not in override:
            raise StudyError(f"--override {override!r}: expected KEY=VALUE, e.g. --override optim.lr=5e-5")


def _methods(options: StudyOptions, study: str) -> list[str]:
    allowed = options.size.budget(study).methods or tuple(METHODS)
    wanted = options.methods if options.methods is not None else list(METHODS)
    return [m for m in METHODS if m in wanted and m in allowed]


def _seeds(options: StudyOptions, study: str) -> list[int]:
    count = options.seeds or (options.size.ablation_seeds if study == "ablations" else options.size.budget(study).seeds)
    return list(range(1, count + 1))


def _study_runs(options: StudyOptions, study: str) -> list[Run]:
    runs = [_base_run(options, study)]
    for method in _methods(options, study):
        runs += [_train_run(options, study, method, seed) for seed in _seeds(options, study)]
    return runs


def _ablation_runs(options: StudyOptions) -> list[Run]:
    """One run per (axis value, seed) of the ablated method; the default point is its study A run."""
    method = options.ablation_method
    runs = []
    for seed in _seeds(options, "ablations"):
        runs.append(_train_run(options, "A", method, seed))  # the reference point (OTR_DEFAULTS)
        for axis, values in options.size.ablation_grid.items():
            for value in values:
                if value != OTR_DEFAULTS[axis]:
                    runs.append(_train_run(options, "ablations", method, seed, (axis, value)))
    return runs


def _run_dir(options: StudyOptions, study: str, method: str, seed: Optional[int],
             ablation: Optional[tuple[str, float]] = None) -> Path:
    path = options.cache_root / options.size.name / study / method
    if ablation:
        path = path / ablation_label(ablation)
    return path / f"seed-{seed}" if seed is not None else path


def _model_overrides(options: StudyOptions) -> list[str]:
    return [f"model.name_or_path={options.model}"] if options.model else []


def _eval_overrides(options: StudyOptions, study: str) -> list[str]:
    budget = options.size.budget(study)
    overrides = [f"eval.benchmarks=[{','.join(BENCHMARKS[study])}]", f"eval.limit={budget.eval_limit}",
                 f"eval.max_new_tokens={budget.eval_max_new_tokens}", f"eval.batch_size={budget.eval_batch}"]
    if study == "B":
        overrides.append(f"eval.data_dir={display_path(options.data_dir)}")
    return overrides


def _train_run(options: StudyOptions, study: str, method: str, seed: int,
               ablation: Optional[tuple[str, float]] = None) -> Run:
    data_study = "A" if study == "ablations" else study
    budget = options.size.budget(data_study)
    run_dir = _run_dir(options, study, method, seed, ablation)
    otr = {ablation[0]: ablation[1]} if ablation else None
    if data_study == "A":
        data = ["recipe=smollm2_demo", "data.synthetic.num_validation=32"]
    else:
        data = ["recipe=smollm2_gsm8k", f"data.source={display_path(options.data_dir / 'gsm8k' / 'train.jsonl')}",
                # Each seed shuffles GSM8K train differently and keeps one epoch's worth: its own subset.
                f"data.max_examples={budget.steps * budget.batch}", "data.validation_size=32"]
    argv = ["train", *data, *_model_overrides(options), f"seed={seed}",
            *METHODS[method].overrides(budget.warmup_steps, otr),
            f"optim.lr={budget.lr}", "optim.scheduler=constant", "optim.warmup_steps=0", "optim.warmup_ratio=0.0",
            f"trainer.max_steps={budget.steps}", f"trainer.micro_batch_size={budget.batch}", "trainer.grad_accum=1",
            f"trainer.save_steps={budget.save_steps}", "trainer.eval_steps=0", "trainer.resume=auto",
            "trainer.progress=false",
            # The base model is its own row (one `otr eval`); the warm-up's end and periodic evals are not
            # part of the budget.
            "eval.before_training=false", "eval.after_warmup=false", "eval.every_steps=0",
            *_eval_overrides(options, data_study),
            f"run.output_dir={display_path(run_dir)}", *options.extra_overrides]
    return Run(study, method, seed, ablation, tuple(argv), run_dir, train_seconds(data_study, budget),
               budget.as_dict() | {"extra_overrides": list(options.extra_overrides)})


def _base_run(options: StudyOptions, study: str) -> Run:
    run_dir = _run_dir(options, study, "base", None)
    data = ["data=synthetic_arith"] if study == "A" else ["data=gsm8k"]  # the prompt format of the training runs
    extra = [o for o in options.extra_overrides if o.startswith(EVAL_KEYS)]
    argv = ["eval", *_model_overrides(options), *data, *_eval_overrides(options, study),
            f"run.output_dir={display_path(run_dir)}", *extra]
    budget = options.size.budget(study)
    return Run(study, "base", None, None, tuple(argv), run_dir, eval_seconds(study, budget) + RUN_OVERHEAD_S / 2,
               budget.as_dict())
