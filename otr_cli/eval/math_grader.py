"""Math answers: extract the final answer from a completion, decide equivalence with a gold answer.

Extraction order: the last ``\\boxed{...}`` (nested braces), "the answer is ...", GSM8K's
``#### N``, else the last number in the text. Equivalence: exact numbers first (``1,000`` = ``1000``,
``0.5`` = ``.5``), then ``math-verify`` on the LaTeX (``\\frac{1}{2}`` = ``0.5``, ``\\sqrt{117}`` =
``3\\sqrt{13}``, tuples, intervals), after removing what graders agree carries no meaning
(``x =``, ``^\\circ``, ``\\%``, ``\\$``, ``\\text{ units}``).
"""

from __future__ import annotations

import re
import threading
from typing import Optional

NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_ANSWER_IS = re.compile(r"(?:final answer|the answer)\s*(?:is|:)\s*:?\s*(.+)", re.IGNORECASE)
_HASHES = re.compile(r"####\s*(.+)")
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")
# Verification runs sympy; a pathological expression must not hang a whole benchmark.
VERIFY_TIMEOUT_S = 5


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces included; None if absent."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        match = list(re.finditer(r"\\boxed\s+([^\s$]+)", text))  # "\boxed 5"
        return match[-1].group(1) if match else None
    begin = text.index("{", start) + 1
    depth = 1
    for index in range(begin, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:index].strip()
    return None  # unbalanced: the completion was cut off inside the box


def _clean_phrase(phrase: str) -> str:
    """'$18$ dollars.' -> '18': the first sentence of an 'answer is' phrase, without wrapping."""
    phrase = phrase.strip().split("\n")[0]
    phrase = re.split(r"(?<!\d)\.(?!\d)|\.(?=\s|$)", phrase)[0]  # end of sentence, not a decimal point
    return phrase.strip().strip("$*").strip()


def extract_math_answer(completion: str) -> Optional[str]:
    """The final answer a completion states (a string, not normalised), or None."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    for pattern in (_ANSWER_IS, _HASHES):
        matches = pattern.findall(completion)
        if matches:
            phrase = _clean_phrase(matches[-1])
            if phrase:
                return phrase
    numbers = re.findall(NUMBER, completion)
    return numbers[-1] if numbers else None


def normalize_answer(answer: str) -> str:
    """Remove notation that does not change the value: $, units in \\text{}, degrees, %, 'x ='."""
    text = answer.strip().strip("$").strip()
    text = re.sub(r"^\\(?:text|textbf|mathrm)\{(.*)\}$", r"\1", text)
    text = re.sub(r"\\text\{\s*[a-zA-Z ]*\}", "", text)  # \text{ cm}, \text{dollars}
    text = re.sub(r"\^\s*\{?\\circ\}?|°|\\%|%|\\\$|\\!|\\,|\\ ", "", text)
    text = text.replace("\\left", "").replace("\\right", "").replace("dfrac", "frac").replace("tfrac", "frac")
    text = re.sub(r"^[a-zA-Z]\s*=\s*(?=[^=]+$)", "", text)  # "x = 5" -> "5" (a single equation only)
    text = re.sub(r"\s*(?:dollars?|cents?|units?|degrees?|meters?|cm|km|hours?|minutes?|days?)\.?$", "", text)
    return text.strip().rstrip(".").strip()


def as_number(text: str) -> Optional[float]:
    """A plain number ('1,000', '-3.5', '.5'); None for anything else (including '1,2')."""
    text = text.strip()
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    try:
        return float(text)
    except ValueError:
        return None


def _math_verify(gold: str, predicted: str) -> bool:
    from math_verify import parse, verify

    # math-verify's timeouts use SIGALRM, which only the main thread may set.
    in_main = threading.current_thread() is threading.main_thread()
    timeout = VERIFY_TIMEOUT_S if in_main else None
    try:
        gold_parsed = parse(f"${gold}$", parsing_timeout=timeout)
        predicted_parsed = parse(f"${predicted}$", parsing_timeout=timeout)
        if not gold_parsed or not predicted_parsed:
            return False
        return bool(verify(gold_parsed, predicted_parsed, timeout_seconds=timeout))
    except Exception:  # noqa: BLE001 - an unparsable answer is a wrong answer, not a crash
        return False


def math_answers_match(predicted: Optional[str], gold: str) -> bool:
    """True when `predicted` (an extracted answer, or None) equals `gold` mathematically."""
    if predicted is None or not str(predicted).strip():
        return False
    left, right = normalize_answer(str(predicted)), normalize_answer(str(gold))
    if left == right:
        return True
    left_number, right_number = as_number(left), as_number(right)
    if left_number is not None and right_number is not None:
        return abs(left_number - right_number) <= 1e-6 * max(1.0, abs(right_number))
    return _math_verify(right, left)


def grade_math(completion: str, gold: str) -> tuple[Optional[str], bool]:
    """(extracted answer, correct) for one completion."""
    extracted = extract_math_answer(completion)
    return extracted, math_answers_match(extracted, gold)


def gold_from_gsm8k(answer_field: str) -> str:
    """GSM8K's reference solution ends with '#### 1,234': the number after it, commas removed."""
    return answer_field.split("####")[-1].strip().replace(",", "")
