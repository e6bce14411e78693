"""Multiple-choice answers: find the letter a completion chose and compare with the gold letter."""

from __future__ import annotations

import re
from typing import Optional, Union

from otr_cli.eval.math_grader import last_boxed

LETTERS = "ABCDEFGHIJ"
_L = f"[{LETTERS}]"
# Phrasings, strongest first; each captures the letter. Letters must stand alone ("A" in "An" is not one).
_PATTERNS = (
    re.compile(rf"(?i:answer)\s*(?:is|:)\s*:?\s*(?i:option\s*)?[\(\[]?\**\s*({_L})\b"),
    re.compile(rf"(?i:option|choice)\s*[\(\[]?({_L})\b"),
    re.compile(rf"\(({_L})\)"),
)
# A line that starts with a letter ("C. reduce the carrying capacity"): weakest, and only when it is unambiguous.
_LINE_START = re.compile(rf"^\s*\**({_L})\**\s*(?:[\.\):]|$)", re.MULTILINE)
# Option markers anywhere ("A. amnion B. chorion"): two different ones mean the options were echoed, not chosen.
_OPTION_MARKER = re.compile(rf"(?:^|\s)\**({_L})\**[\.\)](?=\s|$)", re.MULTILINE)


def _letter_in(text: str) -> Optional[str]:
    """A box's content: 'B', '(B)', '\\text{B}', 'B. Paris' -> 'B'."""
    match = re.match(rf"^\s*(?:\\text\{{)?\s*\(?({_L})\)?(?:\}})?(?:[\s\.\):]|$)", text)
    return match.group(1) if match else None


def extract_choice(completion: str) -> Optional[str]:
    """The letter (A-J) a completion picked, or None.

    \\boxed{B} wins; then "the answer is (B)", "Answer: B", "option B", the last "(B)", a line
    that starts with the letter; within a phrasing the last occurrence counts. A completion that
    lists several options ("A. amnion\\nB. chorion\\n...") without one of the stronger phrasings
    chose nothing: reading its last line as the answer would give a free 1-in-N guess.
    """
    boxed = last_boxed(completion)
    if boxed is not None:
        letter = _letter_in(boxed)
        if letter:
            return letter
    for pattern in _PATTERNS:
        matches = pattern.findall(completion)
        if matches:
            return matches[-1].upper()
    if len(set(_OPTION_MARKER.findall(completion))) > 1:
        return None
    matches = _LINE_START.findall(completion)
    return matches[-1].upper() if matches else None


def gold_letter(gold: Union[str, int]) -> str:
    """Gold as a letter: 'B', 'b', '(B)' or the 0-based index 1 (MMLU's convention) -> 'B'."""
    if isinstance(gold, bool):
        raise ValueError(f"gold {gold!r} is not a choice letter or index")
    if isinstance(gold, int):
        if not 0 <= gold < len(LETTERS):
            raise ValueError(f"gold index {gold} is out of range 0..{len(LETTERS) - 1}")
        return LETTERS[gold]
    letter = _letter_in(str(gold).strip().upper())
    if letter is None:
        raise ValueError(f"gold {gold!r} is not a choice letter (A-J) or a 0-based index")
    return letter


def grade_choice(completion: str, gold: Union[str, int]) -> tuple[Optional[str], bool]:
    """(chosen letter, correct) for one completion."""
    chosen = extract_choice(completion)
    return chosen, chosen is not None and chosen == gold_letter(gold)
