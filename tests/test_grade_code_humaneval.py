"""HumanEval through the code grader: every canonical solution passes; broken ones fail."""

import gzip
import json

import pytest

from helpers import SHARED_DATA
from otr_cli.eval.code_grader import build_program, extract_code, grade_code_many

HUMANEVAL = SHARED_DATA / "humaneval" / "HumanEval.jsonl.gz"
pytestmark = pytest.mark.skipif(not HUMANEVAL.is_file(), reason=f"{HUMANEVAL} not present")


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    with gzip.open(HUMANEVAL, "rt") as handle:
        return [json.loads(line) for line in handle]


@pytest.mark.slow
def test_all_canonical_humaneval_solutions_pass(problems):
    samples = [dict(p, completion=p["canonical_solution"]) for p in problems]
    results = grade_code_many(samples, workers=2)
    failed = [(p["task_id"], r.status, r.stderr_tail[-200:]) for p, r in zip(problems, results) if not r.passed]
    assert len(problems) == 164 and failed == []


def _broken(problem: dict, how: int) -> str:
    if how == 0:
        return "    return None\n"
    if how == 1:
        return "    raise NotImplementedError\n"
    if how == 2:
        return "    import os\n    os._exit(0)\n"  # leaves before any test ran
    return "    while True:\n        pass\n"


@pytest.mark.slow
def test_broken_humaneval_solutions_fail(problems):
    from otr_cli.eval.sandbox import SandboxLimits

    chosen = problems[::8]  # 21 problems, four kinds of breakage
    samples = [dict(p, completion=_broken(p, i % 4)) for i, p in enumerate(chosen)]
    results = grade_code_many(samples, limits=SandboxLimits(timeout_s=3, cpu_s=3), workers=2)
    assert [r.passed for r in results] == [False] * len(chosen)


def test_fenced_chat_completion_defining_the_function_is_used(problems):
    problem = problems[0]
    completion = (f"Here is my solution:\n```python\n{problem['prompt']}{problem['canonical_solution']}```\n"
                  "It compares every pair.")
    assert "Here is my solution" not in extract_code(completion)
    [result] = grade_code_many([dict(problem, completion=completion)], workers=1)
    assert result.passed


def test_program_is_prompt_completion_tests_then_check():
    program, call = build_program("def f(x):\n", "    return x\n", "def check(c):\n    assert c(1) == 1\n", "f")
    assert program.startswith("def f(x):\n    return x\n") and "def check" in program
    assert call == "check(f)"
