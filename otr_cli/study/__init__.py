"""The reproduction study: OTR against SFT and DFT, run as plain `otr train` / `otr eval` commands.

    methods.py   the compared methods as config overrides (same budget for all)
    sizes.py     tiny / default budgets and the wall-clock estimate behind them
    plan.py      the list of runs: (study, method, seed, ablation) -> command + run directory
    paper.py     the GPU-cluster version, printed as SLURM sweeps of recipe qwen8b_math
    runner.py    run, skip (finished) or resume (unfinished) each run in its cached directory
    results.py   the small per-run result files kept in the repository (no weights)
    analysis.py  means and intervals across seeds, paired tests against SFT, step costs
    figures.py   accuracy-by-method and training-curve PNGs
    report.py    docs/results.md

Entry point: scripts/reproduce.py; user guide: docs/study.md.
"""
