"""Benchmark registry: where each benchmark's test split lives and how a record becomes a Problem.

Sources, first match wins: ``eval.paths[name]`` (an explicit file), ``eval.data_dir/<local path>``
(a local copy: ``gsm8k/test.jsonl``, ``humaneval/HumanEval.jsonl.gz``, ...), else
the hub id (``datasets.load_dataset``). ``synthetic_arith`` is generated; ``custom`` reads
``eval.custom_path`` with the configured field names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from otr_cli.config import DataConfig, EvalConfig
from otr_cli.errors import UserError
from otr_cli.eval.math_grader import gold_from_gsm8k

GRADERS = ("math", "choice", "code")


class BenchmarkError(UserError, ValueError):
    """A benchmark that cannot be loaded; the message names the benchmark, key or file."""


@dataclass(frozen=True)
class Problem:
    """One test item.

    question: the text shown to the model (for code: the function prompt).
    gold: the reference answer (math: a string; choice: the 0-based index or letter; code: unused).
    grader: "math", "choice" or "code".
    extra: grader inputs besides the completion (choices; test and entry_point for code).
    """

    problem_id: str
    question: str
    gold: Union[str, int]
    grader: str = "math"
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class BenchmarkSpec:
    """hub: (dataset id, subset, split); local: path under eval.data_dir; to_problem(record, index)."""

    hub: Optional[tuple[str, Optional[str], str]]
    local: Optional[str]
    to_problem: Callable[[dict, int], Problem]
    prompt_style: str = "math_cot"


def _need(record: dict, keys: tuple[str, ...], name: str, index: int) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise BenchmarkError(f"benchmark {name!r} record {index}: missing field(s) {', '.join(missing)} "
                             f"(it has {', '.join(sorted(record))})")


def _gsm8k(record: dict, i: int) -> Problem:
    _need(record, ("question", "answer"), "gsm8k", i)
    return Problem(f"gsm8k-{i}", record["question"], gold_from_gsm8k(record["answer"]))


def gsm8k_worked_solution(answer_field: str) -> str:
    """GSM8K's reference solution as a few-shot reply: calculator notes removed, the answer boxed."""
    import re

    steps, _, final = answer_field.partition("####")
    steps = re.sub(r"<<[^>]*>>", "", steps).strip()
    return f"{steps}\nThe answer is \\boxed{{{final.strip().replace(',', '')}}}."


def few_shot_examples(name: str, eval_cfg: EvalConfig) -> list[tuple[str, str]]:
    """(question, worked solution) pairs: the first eval.few_shot records of the train split."""
    if eval_cfg.few_shot <= 0:
        return []
    if name != "gsm8k":
        raise BenchmarkError(f"eval.few_shot={eval_cfg.few_shot}: worked examples exist only for gsm8k, not {name!r}; "
                             f"use eval.few_shot=0 for {name}")
    if eval_cfg.data_dir:
        path = Path(eval_cfg.data_dir).expanduser() / "gsm8k" / "train.jsonl"
        if not path.is_file():
            raise BenchmarkError(f"eval.few_shot needs {path} (the gsm8k train split)")
        records = _read(str(path), "train")
    else:
        records = _read("openai/gsm8k", "train", "main")
    return [(r["question"], gsm8k_worked_solution(r["answer"])) for r in records[:eval_cfg.few_shot]]


def _math500(record: dict, i: int) -> Problem:
    _need(record, ("problem", "answer"), "math500", i)
    return Problem(record.get("unique_id") or f"math500-{i}", record["problem"], str(record["answer"]))


def _svamp(record: dict, i: int) -> Problem:
    _need(record, ("Body", "Question", "Answer"), "svamp", i)
    body, question = record["Body"].strip(), record["Question"].strip()
    joiner = " " if body.endswith((".", "?", "!")) else ". "
    answer = record["Answer"]
    gold = str(int(answer)) if float(answer).is_integer() else str(answer)
    return Problem(str(record.get("ID") or f"svamp-{i}"), f"{body}{joiner}{question}", gold)


def _mmlu_stem(record: dict, i: int) -> Problem:
    _need(record, ("question", "choices", "answer"), "mmlu_stem", i)
    return Problem(f"mmlu_stem-{i}", record["question"], record["answer"], "choice",
                   {"choices": list(record["choices"]), "subject": record.get("type") or record.get("subject")})


def _humaneval(record: dict, i: int) -> Problem:
    _need(record, ("task_id", "prompt", "test", "entry_point"), "humaneval", i)
    return Problem(record["task_id"], record["prompt"], "", "code",
                   {"test": record["test"], "entry_point": record["entry_point"]})


SPECS: dict[str, BenchmarkSpec] = {
    "gsm8k": BenchmarkSpec(("openai/gsm8k", "main", "test"), "gsm8k/test.jsonl", _gsm8k),
    "math500": BenchmarkSpec(("HuggingFaceH4/MATH-500", None, "test"), "math500/test.jsonl", _math500),
    "svamp": BenchmarkSpec(("ChilleD/SVAMP", None, "test"), "svamp/test.jsonl", _svamp),
    "mmlu_stem": BenchmarkSpec(("TIGER-Lab/MMLU-STEM", None, "test"), "mmlu_stem/test.jsonl", _mmlu_stem,
                               "choice_cot"),
    "humaneval": BenchmarkSpec(("openai_humaneval", None, "test"), "humaneval/HumanEval.jsonl.gz", _humaneval,
                               "code"),
}
# Generated, in the training data's own format: prompted exactly as in training.
SYNTHETIC = {"synthetic_arith": "test", "synthetic_arith_ood": "test_ood"}
BENCHMARK_NAMES = (*SPECS, *SYNTHETIC, "custom")


def prompt_style(name: str, eval_cfg: EvalConfig) -> str:
    """How `name`'s questions are turned into prompts (see otr_cli.eval.prompts)."""
    if name in SPECS:
        return SPECS[name].prompt_style
    if name in SYNTHETIC:
        return "plain"
    return {"math": "math_cot", "choice": "choice_cot", "code": "code"}[eval_cfg.custom_grader]


def _read(source: str, split: str, subset: Optional[str] = None) -> list[dict]:
    from otr_cli.data import DataError, load_records

    try:
        return load_records(source, split, subset=subset)
    except DataError as exc:
        raise BenchmarkError(str(exc)) from exc


def _records(name: str, spec: BenchmarkSpec, eval_cfg: EvalConfig) -> list[dict]:
    if name in eval_cfg.paths:
        path = Path(eval_cfg.paths[name]).expanduser()
        if not path.is_file():
            raise BenchmarkError(f"eval.paths.{name}={eval_cfg.paths[name]!r} is not a file")
        return _read(str(path), "test")
    if eval_cfg.data_dir:
        path = Path(eval_cfg.data_dir).expanduser() / (spec.local or "")
        if not path.is_file():
            raise BenchmarkError(f"benchmark {name!r}: {path} does not exist (eval.data_dir={eval_cfg.data_dir}); "
                                 f"expected the layout <data_dir>/{spec.local}, or set eval.paths.{name}=FILE, "
                                 f"or eval.data_dir=null to load {spec.hub[0] if spec.hub else name} from the hub")
        return _read(str(path), "test")
    hub_id, subset, split = spec.hub
    try:
        return _read(hub_id, split, subset)
    except BenchmarkError as exc:
        raise BenchmarkError(f"benchmark {name!r}: cannot load {hub_id} from the hub ({exc}). Offline, set "
                             f"eval.data_dir=DIR holding {spec.local}, or eval.paths.{name}=FILE") from exc


def _custom(eval_cfg: EvalConfig) -> list[Problem]:
    if not eval_cfg.custom_path:
        raise BenchmarkError("benchmark 'custom' needs eval.custom_path=FILE (.jsonl/.json/.parquet)")
    if eval_cfg.custom_grader not in GRADERS:
        raise BenchmarkError(f"eval.custom_grader={eval_cfg.custom_grader!r} is not one of {', '.join(GRADERS)}")
    path = Path(eval_cfg.custom_path).expanduser()
    if not path.is_file():
        raise BenchmarkError(f"eval.custom_path={eval_cfg.custom_path!r} is not a file")
    from otr_cli.data.sources import read_source

    records = read_source(str(path), "test")
    problems = []
    q_key, a_key = eval_cfg.custom_question_field, eval_cfg.custom_answer_field
    for index in range(len(records)):
        record = records[index]
        if eval_cfg.custom_grader == "code":
            _need(record, ("prompt", "test", "entry_point"), "custom", index)
            problems.append(Problem(str(record.get("task_id", f"custom-{index}")), record["prompt"], "", "code",
                                    {"test": record["test"], "entry_point": record["entry_point"]}))
            continue
        missing = [k for k in (q_key, a_key) if k not in record]
        if missing:
            raise BenchmarkError(f"{records.where(index)}: missing field(s) {', '.join(missing)} "
                                 f"(eval.custom_question_field / eval.custom_answer_field; the record has "
                                 f"{', '.join(sorted(record))})")
        extra = {"choices": list(record["choices"])} if eval_cfg.custom_grader == "choice" and "choices" in record else {}
        gold: Any = record[a_key] if eval_cfg.custom_grader == "choice" else str(record[a_key])
        problems.append(Problem(str(record.get("id", f"custom-{index}")), str(record[q_key]), gold,
                                eval_cfg.custom_grader, extra))
    return problems


def load_benchmark(name: str, eval_cfg: EvalConfig, data_cfg: DataConfig, limit: Optional[int] = None
                   ) -> list[Problem]:
    """The first `limit` problems (all when None) of benchmark `name`."""
    if name in SYNTHETIC:
        from otr_cli.data.synthetic_arith import generate_split

        records = generate_split(data_cfg.synthetic, SYNTHETIC[name])
        problems = [Problem(f"{SYNTHETIC[name]}-{i}", r["question"], r["final_answer"]) for i, r in enumerate(records)]
    elif name == "custom":
        problems = _custom(eval_cfg)
    elif name in SPECS:
        records = _records(name, SPECS[name], eval_cfg)
        problems = [SPECS[name].to_problem(dict(r), i) for i, r in enumerate(records)]
    else:
        raise BenchmarkError(f"unknown benchmark {name!r} in eval.benchmarks; available: {', '.join(BENCHMARK_NAMES)}")
    return problems[:limit] if limit else problems
