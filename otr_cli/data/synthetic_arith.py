"""Built-in multi-step arithmetic word problems with worked solutions (``data.source=synthetic_arith``).

A problem is a start count and a chain of operations told as a short story::

    question: Maya has 12 marbles. She buys 7 more marbles. Maya gives 5 marbles to Noah.
              She triples her marbles. How many marbles does Maya have now?
    answer:   12 + 7 = 19
              19 - 5 = 14
              14 * 3 = 42
              The answer is 42.
    final_answer: "42"

Splits are deterministic functions of ``(cfg.seed, split)`` and disjoint: each problem's
arithmetic skeleton (start value and operations) is hashed into one of four buckets, one per
split, and a split keeps only candidates from its own bucket. Two identical questions have the
same skeleton, so no question can appear in two splits; the same computation told with other
names cannot either. Each split's problems are drawn in a fixed order, so raising ``num_train``
keeps the first problems and adds more.

In distribution (train, validation, test): ``min_steps..max_steps`` operations, operands up to
``max_operand``. Out of distribution (test_ood): ``ood_steps`` operations, operands up to
``ood_max_operand``: longer chains and larger numbers. Results are never negative (subtraction
always leaves at least one), division happens only when it is exact, and multiplication uses
small factors (2-4).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Callable, Optional

from otr_cli.config import SyntheticArithConfig
from otr_cli.data.errors import DataError

SPLITS = ("train", "validation", "test", "test_ood")
MAX_FACTOR = 4  # multiplication factors 2..MAX_FACTOR
MAX_DIVISOR = 5  # exact division by 2..MAX_DIVISOR
MAX_MISSES_IN_A_ROW = 5000
_FRACTIONS = {2: "half", 3: "a third", 4: "a quarter", 5: "a fifth"}
FINAL_LINE = "The answer is {value}."
_FINAL_ANSWER = re.compile(r"The answer is\s*\$?\s*(-?[\d,]*\d)")

# (name, subject pronoun, possessive, reflexive)
PEOPLE = [
    ("Maya", "she", "her", "herself"), ("Liam", "he", "his", "himself"), ("Sofia", "she", "her", "herself"),
    ("Noah", "he", "his", "himself"), ("Aisha", "she", "her", "herself"), ("Mateo", "he", "his", "himself"),
    ("Chen", "he", "his", "himself"), ("Priya", "she", "her", "herself"), ("Omar", "he", "his", "himself"),
    ("Elena", "she", "her", "herself"), ("Kofi", "he", "his", "himself"), ("Hana", "she", "her", "herself"),
    ("Lucas", "he", "his", "himself"), ("Zara", "she", "her", "herself"), ("Ivan", "he", "his", "himself"),
    ("Amara", "she", "her", "herself"), ("Diego", "he", "his", "himself"), ("Yuki", "she", "her", "herself"),
    ("Sam", "he", "his", "himself"), ("Nora", "she", "her", "herself"),
]
# (singular, plural)
OBJECTS = [
    ("marble", "marbles"), ("apple", "apples"), ("sticker", "stickers"), ("book", "books"),
    ("coin", "coins"), ("pencil", "pencils"), ("seashell", "seashells"), ("trading card", "trading cards"),
    ("cookie", "cookies"), ("stamp", "stamps"), ("flower", "flowers"), ("toy car", "toy cars"),
    ("bead", "beads"), ("balloon", "balloons"), ("egg", "eggs"), ("ribbon", "ribbons"),
]


@dataclass(frozen=True)
class _Story:
    """The characters of one problem; sentence templates read from it."""

    name: str
    pronoun: str
    possessive: str
    reflexive: str
    other: str
    singular: str
    plural: str

    def count(self, n: int) -> str:
        return f"{n} {self.singular if n == 1 else self.plural}"

    def more(self, n: int) -> str:
        return f"{n} more {self.singular if n == 1 else self.plural}"

    @property
    def Pronoun(self) -> str:  # noqa: N802 - reads naturally in the templates below
        return self.pronoun.capitalize()


# Sentence templates per operation; each takes the story and the operand.
_ADD: list[Callable[[_Story, int], str]] = [
    lambda s, n: f"{s.name} buys {s.more(n)}.",
    lambda s, n: f"{s.other} gives {s.name} {s.count(n)}.",
    lambda s, n: f"{s.Pronoun} finds {s.more(n)}.",
    lambda s, n: f"{s.name} collects another {s.count(n)}.",
    lambda s, n: f"Then {s.pronoun} receives {s.count(n)} as a gift.",
]
_SUBTRACT: list[Callable[[_Story, int], str]] = [
    lambda s, n: f"{s.name} gives {s.count(n)} to {s.other}.",
    lambda s, n: f"{s.Pronoun} loses {s.count(n)}.",
    lambda s, n: f"{s.name} sells {n} of {s.possessive} {s.plural}.",
    lambda s, n: f"Then {s.pronoun} donates {s.count(n)} to a school.",
    lambda s, n: f"{s.other} takes {s.count(n)} from {s.name}.",
]
_MULTIPLY: list[Callable[[_Story, int], str]] = [
    lambda s, k: f"{s.name} ends up with {k} times as many {s.plural} as before.",
    lambda s, k: f"The number of {s.plural} {s.name} has grows to {k} times what it was.",
    lambda s, k: (f"{s.name} doubles {s.possessive} {s.plural}." if k == 2 else
                  f"{s.name} triples {s.possessive} {s.plural}." if k == 3 else
                  f"{s.Pronoun} buys enough to have {k} times as many {s.plural}."),
]
_DIVIDE: list[Callable[[_Story, int], str]] = [
    lambda s, k: f"{s.name} splits {s.possessive} {s.plural} equally into {k} boxes and keeps only one box.",
    lambda s, k: (f"{s.name} shares {s.possessive} {s.plural} equally between {s.reflexive} and "
                  f"{k - 1} {'friend' if k == 2 else 'friends'} and keeps one share."),
    lambda s, k: (f"{s.name} gives away half of {s.possessive} {s.plural}." if k == 2 else
                  f"{s.Pronoun} keeps {_FRACTIONS[k]} of {s.possessive} {s.plural} and gives the rest away."),
]


@dataclass(frozen=True)
class _Limits:
    steps: tuple[int, int]  # inclusive range of operations
    max_operand: int


def _limits(cfg: SyntheticArithConfig, split: str) -> _Limits:
    if split == "test_ood":
        return _Limits((cfg.ood_steps, cfg.ood_steps), cfg.ood_max_operand)
    return _Limits((cfg.min_steps, cfg.max_steps), cfg.max_operand)


def _bucket(seed: int, skeleton: str) -> str:
    """The split a skeleton belongs to (uniform over SPLITS, independent of Python's hash seed)."""
    digest = hashlib.sha256(f"{seed}|{skeleton}".encode()).digest()
    return SPLITS[int.from_bytes(digest[:8], "big") % len(SPLITS)]


def _draw_problem(rng: random.Random, limits: _Limits) -> dict:
    """One random problem: question, worked answer, final answer and its skeleton."""
    name, pronoun, possessive, reflexive = rng.choice(PEOPLE)
    other = rng.choice([person[0] for person in PEOPLE if person[0] != name])
    singular, plural = rng.choice(OBJECTS)
    story = _Story(name, pronoun, possessive, reflexive, other, singular, plural)
    # Cap before multiplying keeps numbers in a range the model can learn to add.
    value_cap = 10 * limits.max_operand

    value = rng.randint(2, max(2, limits.max_operand))
    sentences = [f"{name} has {story.count(value)}."]
    lines: list[str] = []
    skeleton = [str(value)]
    for _ in range(rng.randint(*limits.steps)):
        choices = ["add"]
        if value >= 2:
            choices.append("subtract")
        factors = [k for k in range(2, MAX_FACTOR + 1) if value * k <= value_cap]
        if factors:
            choices.append("multiply")
        divisors = [k for k in range(2, MAX_DIVISOR + 1) if value % k == 0]
        if divisors:
            choices.append("divide")
        operation = rng.choice(choices)
        if operation == "add":
            operand = rng.randint(1, limits.max_operand)
            result, symbol, template = value + operand, "+", rng.choice(_ADD)
        elif operation == "subtract":
            operand = rng.randint(1, min(limits.max_operand, value - 1))
            result, symbol, template = value - operand, "-", rng.choice(_SUBTRACT)
        elif operation == "multiply":
            operand = rng.choice(factors)
            result, symbol, template = value * operand, "*", rng.choice(_MULTIPLY)
        else:
            operand = rng.choice(divisors)
            result, symbol, template = value // operand, "/", rng.choice(_DIVIDE)
        sentences.append(template(story, operand))
        lines.append(f"{value} {symbol} {operand} = {result}")
        skeleton.append(f"{symbol}{operand}")
        value = result
    sentences.append(f"How many {plural} does {name} have now?")
    lines.append(FINAL_LINE.format(value=value))
    return {
        "question": " ".join(sentences),
        "answer": "\n".join(lines),
        "final_answer": str(value),
        "num_steps": len(lines) - 1,
        "_skeleton": "".join(skeleton),
    }


def generate_split(cfg: SyntheticArithConfig, split: str) -> list[dict]:
    """Records ``{question, answer, final_answer, num_steps}`` of one split.

    split: "train" (cfg.num_train records), "validation" (cfg.num_validation), "test" and
    "test_ood" (cfg.num_test each). Deterministic in (cfg.seed, split) and the limits.
    """
    sizes = {"train": cfg.num_train, "validation": cfg.num_validation, "test": cfg.num_test,
             "test_ood": cfg.num_test}
    if split not in sizes:
        raise DataError(f"synthetic_arith has no split {split!r}; choose one of {', '.join(SPLITS)} "
                        f"(data.split / data.validation_split)")
    limits = _limits(cfg, split)
    if limits.steps[0] < 1 or limits.steps[0] > limits.steps[1] or limits.max_operand < 2:
        raise DataError(f"synthetic_arith split {split!r}: need 1 <= steps (got {limits.steps[0]}..{limits.steps[1]}) "
                        f"and operands >= 2 (got {limits.max_operand}); check data.synthetic.min_steps, "
                        f"max_steps, max_operand, ood_steps, ood_max_operand")
    wanted = sizes[split]
    rng = random.Random(f"synthetic_arith|{cfg.seed}|{split}")  # str seeds hash with sha512: stable
    records: list[dict] = []
    seen: set[str] = set()
    # Misses (other bucket, duplicate) run at ~75%; thousands in a row mean the space is exhausted.
    misses_in_a_row = 0
    while len(records) < wanted:
        if misses_in_a_row == MAX_MISSES_IN_A_ROW:
            raise DataError(
                f"synthetic_arith split {split!r}: only {len(records)} distinct problems of the {wanted} asked "
                f"for exist with these limits; raise data.synthetic.max_operand / max_steps or lower the split size"
            )
        problem = _draw_problem(rng, limits)
        skeleton = problem.pop("_skeleton")
        if skeleton in seen or _bucket(cfg.seed, skeleton) != split:
            misses_in_a_row += 1
            continue
        misses_in_a_row = 0
        seen.add(skeleton)
        records.append(problem)
    return records


def parse_final_answer(text: str) -> Optional[str]:
    """The integer after the last "The answer is", as a string without commas; None if absent."""
    matches = _FINAL_ANSWER.findall(text)
    return matches[-1].replace(",", "") if matches else None
