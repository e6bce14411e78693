"""Final-answer extraction and equivalence for math word problems."""

from __future__ import annotations

import re
from typing import Optional

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
ANSWER_PATTERNS = (
    re.compile(r"the (?:final )?answer is[:\s]*\$?\\?(?:boxed\{)?\s*(" + _NUMBER + ")", re.IGNORECASE),
    re.compile(r"####\s*\$?(" + _NUMBER + ")"),
)


def last_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...}, with nested braces."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for index in range(begin - 1, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:index].strip()
    return None


def extract_answer(completion: str) -> Optional[str]:
    """The final answer a completion states: \\boxed{}, 'the answer is', '####', else the last number."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    for pattern in ANSWER_PATTERNS:
        matches = pattern.findall(completion)
        if matches:
            return matches[-1]
    numbers = re.findall(_NUMBER, completion)
    return numbers[-1] if numbers else None


def _as_number(text: str) -> Optional[float]:
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return float(cleaned)
    except ValueError:
        return None


def answers_match(predicted: Optional[str], gold: str) -> bool:
    """Numeric equality when both parse as numbers, else math-verify's symbolic check."""
    if predicted is None:
        return False
    left, right = _as_number(predicted), _as_number(gold)
    if left is not None and right is not None:
        return abs(left - right) <= 1e-6 * max(1.0, abs(right))
    from math_verify import parse, verify

    return bool(verify(parse(f"${gold}$"), parse(f"${predicted}$")))


def gold_from_gsm8k(answer_field: str) -> str:
    return answer_field.split("####")[-1].strip().replace(",", "")
