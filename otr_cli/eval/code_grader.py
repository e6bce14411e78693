"""Code answers (HumanEval style): build the program from a completion and run its tests in the sandbox."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from otr_cli.eval.sandbox import Isolation, SandboxLimits, SandboxResult, detect_isolation, run_program

_FENCE = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(completion: str) -> str:
    """The code in a completion: the fenced blocks (```python ... ```) joined, else the text as is.

    A chat model writes prose around a fenced block; a base model continues the prompt with raw code.
    """
    blocks = _FENCE.findall(completion)
    return "\n\n".join(block.rstrip() for block in blocks) if blocks else completion


def build_program(prompt: str, completion: str, test: str, entry_point: str) -> tuple[str, str]:
    """(program source, check statement) for one HumanEval-style sample.

    If the completion's code defines `entry_point` itself it follows the prompt (its definition
    wins, the prompt still provides imports and helpers); otherwise it continues the prompt's body.
    """
    code = extract_code(completion)
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        body = f"{prompt}\n    pass\n\n{code}"
    else:
        body = prompt + code
    return f"{body}\n\n{test}\n", f"check({entry_point})"


def grade_code(prompt: str, completion: str, test: str, entry_point: str,
               limits: SandboxLimits = SandboxLimits(), isolation: Optional[Isolation] = None) -> SandboxResult:
    """Run the sample's tests against the completion; `.passed` only if `check` returned."""
    program, call = build_program(prompt, completion, test, entry_point)
    return run_program(program, call, limits, isolation)


def grade_code_many(samples: list[dict], limits: SandboxLimits = SandboxLimits(), workers: int = 2,
                    isolation: Optional[Isolation] = None) -> list[SandboxResult]:
    """Grade samples (dicts with prompt, completion, test, entry_point) in parallel, results in order.

    Each sample is its own process; threads only wait on them, so `workers` bounds CPU use.
    """
    isolation = isolation or detect_isolation()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda s: grade_code(s["prompt"], s["completion"], s["test"], s["entry_point"],
                                                  limits, isolation), samples))
