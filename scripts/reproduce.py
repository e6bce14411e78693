"""The reproduction study: OTR against SFT and DFT under one budget, then docs/results.md.

    python scripts/reproduce.py --size tiny            # ~12-minute smoke version on a 2-core CPU
    python scripts/reproduce.py                        # default size, ~1 h 50 min on a 2-core CPU
    python scripts/reproduce.py --only A --seeds 5     # a piece of it; rerun to resume
    python scripts/reproduce.py --dry-run              # the commands and the time estimate
    python scripts/reproduce.py --report               # docs/results.md from the kept result files
    python scripts/reproduce.py --size paper           # print the SLURM sweeps of the GPU version

Every run is one `otr train` (or `otr eval`, for the base model) in its own directory under
--cache-root: finished runs are skipped, interrupted ones resume. Each finished run's small
result file (scores, per-problem outcomes, curves; no weights) is written to
docs/study/results/<size>/, and the report is generated from those files. See docs/study.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from otr_cli.errors import UserError
from otr_cli.study.methods import ABLATION_METHODS, METHODS, StudyError, check_methods
from otr_cli.study.plan import REPO, STUDIES, StudyOptions, build_plan, display_path, estimate_seconds
from otr_cli.study.sizes import SIZE_NAMES, SIZES, format_duration, wall_seconds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/reproduce.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Sizes, time estimates and resuming: docs/study.md")
    parser.add_argument("--size", choices=SIZE_NAMES, default="default",
                        help="tiny: ~12 min smoke run; default: ~1 h 50 min on a 2-core CPU; "
                             "paper: print SLURM commands")
    parser.add_argument("--only", choices=STUDIES, help="run one study: A (synthetic_arith), B (GSM8K), ablations")
    parser.add_argument("--methods", nargs="+", metavar="METHOD",
                        help=f"methods to run (default: all the size runs): {', '.join(METHODS)}")
    parser.add_argument("--seeds", type=int, help="seeds per method in every study (default: the size's)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs at once, the CPU cores shared between them (default: 2 where there are 2 cores; "
                             "1: one run using every core)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and the estimate; run nothing")
    parser.add_argument("--report", action="store_true",
                        help="only regenerate docs/results.md from the result files of --size")
    advanced = parser.add_argument_group("advanced")
    advanced.add_argument("--cache-root", type=Path, default=REPO / "outputs" / "study",
                          help="where run directories live (default: outputs/study)")
    advanced.add_argument("--model", help="model to fine-tune instead of the recipes' SmolLM2-135M-Instruct "
                                          "(a directory or hub id; tests use a tiny random model)")
    advanced.add_argument("--data-dir", type=Path, default=Path(os.environ.get("OTR_DATA_DIR") or REPO / "data"),
                          help="study B's local copy of GSM8K, SVAMP, MMLU-STEM and HumanEval, laid out as in "
                               "docs/eval.md (default: $OTR_DATA_DIR, else data/ in the checkout)")
    advanced.add_argument("--docs-dir", type=Path, default=REPO / "docs",
                          help="where results.md, study/results/ and the figures go (default: docs)")
    advanced.add_argument("--ablation-method", default="warmup_otr", choices=ABLATION_METHODS,
                          help="method whose K, temperature and beta are varied (default: warmup_otr)")
    advanced.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                          help="extra `otr train` override for every run (repeatable; model./data./eval. keys "
                               "also reach the base model's evaluation)")
    advanced.add_argument("--keep-checkpoints", action="store_true",
                          help="keep finished runs' DeepSpeed checkpoints (default: delete them, keep final/)")
    advanced.add_argument("--no-report", action="store_true", help="do not write docs/results.md after running")
    advanced.add_argument("--partition", default="gpu", help="SLURM partition of the --size paper commands")
    return parser.parse_args(argv)


def print_paper(args: argparse.Namespace) -> None:
    from otr_cli.study.paper import paper_commands

    methods = check_methods(args.methods) if args.methods else list(METHODS)
    for line in paper_commands(methods, args.only, args.seeds, args.ablation_method, args.partition,
                               args.cache_root, args.model):
        print(line)


def print_plan(runs, jobs: int) -> None:
    from otr_cli.study.runner import run_status

    status = {run.key: run_status(run) for run in runs}
    todo = [run for run in runs if status[run.key] != "finished"]
    estimate = format_duration(wall_seconds(estimate_seconds(todo), jobs))
    print(f"# {len(runs)} runs: {len(runs) - len(todo)} finished, "
          f"{sum(1 for r in todo if status[r.key] == 'unfinished')} to resume, "
          f"{sum(1 for r in todo if status[r.key] == 'new')} new; estimated {estimate} "
          f"for the rest on a 2-core CPU with --jobs {jobs} (docs/study.md). Commands run from {REPO}.")
    for run in runs:
        print(f"# {run.key} [{status[run.key]}, ~{format_duration(run.estimate_s)}]")
        print(run.command())


def report(results_dir: Path, size: str, docs_dir: Path) -> Path:
    from otr_cli.study.report import write_report
    from otr_cli.study.results import load_results

    return write_report(load_results(results_dir), size, results_dir, docs_dir)


def run(args: argparse.Namespace) -> int:
    if args.size == "paper":
        if args.report or not args.dry_run:
            print("# --size paper prints the commands of the GPU-cluster version; it runs nothing here.")
        print_paper(args)
        return 0
    if args.jobs < 1:
        raise StudyError(f"--jobs {args.jobs}: needs at least 1 (runs at once)")
    size = SIZES[args.size]
    results_dir = args.docs_dir / "study" / "results" / size.name
    if args.report:
        print(f"wrote {display_path(report(results_dir, size.name, args.docs_dir))}")
        return 0
    # The runs start in the repository root: a local model path given from elsewhere must still point at it.
    model = display_path(Path(args.model)) if args.model and Path(args.model).exists() else args.model
    options = StudyOptions(size=size, only=args.only, methods=check_methods(args.methods) if args.methods else None,
                           seeds=args.seeds, ablation_method=args.ablation_method, cache_root=args.cache_root,
                           model=model, data_dir=args.data_dir, extra_overrides=tuple(args.override))
    runs = build_plan(options)
    if args.dry_run:
        print_plan(runs, args.jobs)
        return 0
    from otr_cli.study.runner import check_data_dir, run_plan

    check_data_dir(runs, args.data_dir)
    print(f"study size {size.name}: {len(runs)} runs under {display_path(args.cache_root / size.name)}; "
          f"results to {display_path(results_dir)}")
    outcomes = run_plan(runs, results_dir, size.name, keep_checkpoints=args.keep_checkpoints, jobs=args.jobs)
    failed = [o for o in outcomes if o.status == "failed"]
    counts = {s: sum(1 for o in outcomes if o.status == s) for s in ("finished", "skipped", "failed")}
    print(f"done: {counts['finished']} run, {counts['skipped']} skipped (finished earlier), {counts['failed']} failed")
    if not args.no_report and results_dir.is_dir():
        print(f"wrote {display_path(report(results_dir, size.name, args.docs_dir))}")
    if failed:
        print("failed: " + ", ".join(o.run.key for o in failed) + "; see each run's study.log, fix, and run the "
              "same command again (finished runs are skipped)", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume (finished runs are skipped)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
