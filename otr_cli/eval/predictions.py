"""`otr grade`: read a predictions file, grade every line with one grader, write the graded lines.

Input: JSON lines, each with ``completion`` and ``gold`` (math, choice) or ``prompt``,
``completion``, ``test``, ``entry_point`` (code). Output: each input line plus ``extracted`` and
``correct`` (code: ``extracted`` is the code that ran, plus ``status``), in the input order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from otr_cli.atomic import write_jsonl_atomic
from otr_cli.errors import UserError
from otr_cli.eval.choice_grader import gold_letter, grade_choice
from otr_cli.eval.code_grader import extract_code, grade_code_many
from otr_cli.eval.math_grader import grade_math
from otr_cli.eval.sandbox import SandboxLimits, detect_isolation

GRADERS = ("math", "choice", "code")
REQUIRED_FIELDS = {"math": ("completion", "gold"), "choice": ("completion", "gold"),
                   "code": ("prompt", "completion", "test", "entry_point")}


class GradeInputError(UserError, ValueError):
    """A predictions file that cannot be graded; the message names the file and line."""


@dataclass
class GradeSummary:
    grader: str
    n: int
    correct: int
    output: Optional[Path] = None

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0


def read_predictions(path: Path, grader: str) -> list[dict]:
    """Lines of `path` as dicts, each checked for the fields `grader` needs (errors say file:line)."""
    if grader not in GRADERS:
        raise GradeInputError(f"grader={grader!r} is not one of {', '.join(GRADERS)}")
    if not path.is_file():
        raise GradeInputError(f"predictions file {path} does not exist")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise GradeInputError(f"{path}:{number}: malformed JSON ({exc.msg} at column {exc.colno})") from exc
            if not isinstance(row, dict):
                raise GradeInputError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            missing = [key for key in REQUIRED_FIELDS[grader] if key not in row]
            if missing:
                raise GradeInputError(f"{path}:{number}: missing field(s) {', '.join(missing)} needed by "
                                      f"grader={grader} (the line has: {', '.join(sorted(row)) or 'nothing'})")
            for key in REQUIRED_FIELDS[grader]:
                if key != "gold" and not isinstance(row[key], str):
                    raise GradeInputError(f"{path}:{number}: field {key!r} must be a string, "
                                          f"got {type(row[key]).__name__}")
            if grader == "choice":
                try:
                    gold_letter(row["gold"])
                except ValueError as exc:
                    raise GradeInputError(f"{path}:{number}: {exc}") from exc
            rows.append(row)
    if not rows:
        raise GradeInputError(f"{path} holds no predictions")
    return rows


def grade_rows(rows: list[dict], grader: str, *, limits: SandboxLimits = SandboxLimits(),
               workers: int = 2) -> list[dict]:
    """Copies of `rows` with `correct` and `extracted` (math, choice) or `status` (code) added."""
    if grader == "code":
        results = grade_code_many(rows, limits, workers)
        return [dict(row, extracted=extract_code(row["completion"]), correct=result.passed, status=result.status)
                for row, result in zip(rows, results)]
    grade = grade_math if grader == "math" else grade_choice
    graded = []
    for row in rows:
        extracted, correct = grade(row["completion"], row["gold"] if grader == "choice" else str(row["gold"]))
        graded.append(dict(row, extracted=extracted, correct=correct))
    return graded


def grade_file(predictions: Path, grader: str, output: Path, *, limits: SandboxLimits = SandboxLimits(),
               workers: int = 2) -> GradeSummary:
    """Grade `predictions` into `output` (written atomically); returns the counts."""
    rows = read_predictions(predictions, grader)
    graded = grade_rows(rows, grader, limits=limits, workers=workers)
    write_jsonl_atomic(output, graded)
    return GradeSummary(grader, len(graded), sum(bool(r["correct"]) for r in graded), output)


# The old `otr grade key=value` spelling, still taken for one release (command_line.py).
DEPRECATED_GRADE_KEYS = {"predictions": None, "grader": "--grader", "output": "--output", "workers": "--workers",
                         "timeout": "--timeout", "memory_mb": "--memory-mb", "isolation": "--isolation"}


def grade_parser():
    from otr_cli.command_line import CommandParser
    from otr_cli.eval.sandbox import ISOLATIONS

    parser = CommandParser(
        prog="otr grade", description="Grade every line of a predictions file with one grader; write each line "
                                      "with `extracted` and `correct` added, in the input order.",
        epilog="The old spelling `otr grade predictions=FILE grader=math output=OUT workers=2 timeout=10 "
               "memory_mb=2048 isolation=auto` still works in this release, with a deprecation note.")
    parser.add_argument("predictions", type=Path, metavar="PREDICTIONS.jsonl",
                        help="JSON lines: completion and gold (math, choice); prompt, completion, test, "
                             "entry_point (code)")
    parser.add_argument("--grader", required=True, choices=GRADERS, help="how to score a completion")
    parser.add_argument("--output", type=Path, metavar="OUT.jsonl",
                        help="graded lines (default: PREDICTIONS.graded.jsonl beside the input)")
    parser.add_argument("--workers", type=int, default=2, help="code: programs run at once (default 2)")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="code: wall and CPU time of one program (default 10)")
    parser.add_argument("--memory-mb", type=int, default=2048, help="code: memory of one program (default 2048)")
    parser.add_argument("--isolation", default="auto", choices=ISOLATIONS,
                        help="code: the sandbox (default auto: the strongest this machine allows)")
    return parser


def parse_grade_args(args: list[str]):
    """`otr grade`'s arguments (flags, or the deprecated key=value) as an argparse namespace."""
    from otr_cli.command_line import rewrite_deprecated_key_values

    return grade_parser().parse_args(rewrite_deprecated_key_values(args, DEPRECATED_GRADE_KEYS, "otr grade"))


def grade_command(args: list[str]) -> int:
    """Body of `otr grade`: grade a file, print a summary. Returns the exit code."""
    from rich.console import Console

    options = parse_grade_args(args)
    output = options.output or options.predictions.with_name(options.predictions.stem + ".graded.jsonl")
    limits = SandboxLimits(timeout_s=options.timeout, memory_mb=options.memory_mb, cpu_s=int(options.timeout))
    console = Console()
    if options.grader == "code":
        isolation = detect_isolation(options.isolation)
        console.print(f"sandbox isolation: {isolation.describe()}", highlight=False)
    summary = grade_file(options.predictions, options.grader, output, limits=limits, workers=options.workers)
    console.print(f"grader={summary.grader}: {summary.correct}/{summary.n} correct "
                  f"(accuracy {summary.accuracy:.1%}); graded lines in {output}", highlight=False)
    if options.grader == "code":
        from collections import Counter

        statuses = Counter(json.loads(line)["status"] for line in output.read_text().splitlines() if line)
        console.print("sandbox outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())),
                      highlight=False)
    return 0
