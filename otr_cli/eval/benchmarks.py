"""Benchmark registry: each benchmark yields (question, gold answer) problems."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from otr_cli.config import DataConfig, EvalConfig
from otr_cli.eval.grading import gold_from_gsm8k


@dataclass(frozen=True)
class Problem:
    problem_id: str
    question: str
    gold: str


class BenchmarkError(ValueError):
    pass


def _synthetic(split: str) -> Callable[[EvalConfig, DataConfig], list[Problem]]:
    def load(eval_cfg: EvalConfig, data_cfg: DataConfig) -> list[Problem]:
        from otr_cli.data.synthetic_arith import generate_split

        records = generate_split(data_cfg.synthetic, split)
        return [Problem(f"{split}-{i}", r["question"], r["final_answer"]) for i, r in enumerate(records)]

    return load


def _local_jsonl(eval_cfg: EvalConfig, name: str) -> list[dict]:
    if not eval_cfg.data_dir:
        raise BenchmarkError(f"benchmark {name!r}: set eval.data_dir to a directory holding {name}/test.jsonl "
                             f"(hub loading of {name} comes with `otr eval`).")
    path = Path(eval_cfg.data_dir) / name / "test.jsonl"
    if not path.is_file():
        raise BenchmarkError(f"benchmark {name!r}: {path} does not exist (eval.data_dir={eval_cfg.data_dir}).")
    with path.open() as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _gsm8k(eval_cfg: EvalConfig, data_cfg: DataConfig) -> list[Problem]:
    rows = _local_jsonl(eval_cfg, "gsm8k")
    return [Problem(f"gsm8k-{i}", r["question"], gold_from_gsm8k(r["answer"])) for i, r in enumerate(rows)]


def _svamp(eval_cfg: EvalConfig, data_cfg: DataConfig) -> list[Problem]:
    rows = _local_jsonl(eval_cfg, "svamp")
    return [Problem(f"svamp-{i}", f"{r['Body'].strip()} {r['Question'].strip()}", str(r["Answer"]))
            for i, r in enumerate(rows)]


BENCHMARKS: dict[str, Callable[[EvalConfig, DataConfig], list[Problem]]] = {
    "synthetic_arith": _synthetic("test"),
    "synthetic_arith_ood": _synthetic("test_ood"),
    "gsm8k": _gsm8k,
    "svamp": _svamp,
}


def load_benchmark(name: str, eval_cfg: EvalConfig, data_cfg: DataConfig, limit: Optional[int]) -> list[Problem]:
    if name not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r} in eval.benchmarks; available: {', '.join(BENCHMARKS)}")
    problems = BENCHMARKS[name](eval_cfg, data_cfg)
    return problems[:limit] if limit else problems
