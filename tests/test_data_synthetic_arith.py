"""synthetic_arith: deterministic, disjoint splits of correct worked solutions; OOD is harder."""

from __future__ import annotations

import re

import pytest

from otr_cli.config import SyntheticArithConfig
from otr_cli.data import DataError, generate_split, parse_final_answer

SMALL = SyntheticArithConfig(num_train=300, num_validation=40, num_test=60)
LINE = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)$")


def _operations(record: dict) -> list[tuple[int, str, int, int]]:
    """(left, symbol, operand, result) of each worked line; asserts the answer's layout."""
    *lines, final = record["answer"].split("\n")
    assert final == f"The answer is {record['final_answer']}."
    parsed = []
    for line in lines:
        match = LINE.match(line)
        assert match, f"not an operation line: {line!r}"
        left, symbol, operand, result = match.groups()
        parsed.append((int(left), symbol, int(operand), int(result)))
    return parsed


def test_same_seed_and_split_give_identical_records():
    assert generate_split(SMALL, "train") == generate_split(SMALL, "train")
    assert generate_split(SMALL, "test_ood") == generate_split(SMALL, "test_ood")


def test_other_seed_gives_other_problems():
    other = SyntheticArithConfig(num_train=300, num_validation=40, num_test=60, seed=SMALL.seed + 1)
    first = {r["question"] for r in generate_split(SMALL, "train")}
    second = {r["question"] for r in generate_split(other, "train")}
    assert len(first & second) < 10


def test_growing_a_split_keeps_its_first_problems():
    bigger = SyntheticArithConfig(num_train=400, num_validation=40, num_test=60)
    assert generate_split(bigger, "train")[:300] == generate_split(SMALL, "train")


def test_splits_are_disjoint_and_sized_by_config():
    splits = {name: generate_split(SMALL, name) for name in ("train", "validation", "test", "test_ood")}
    assert [len(splits[n]) for n in ("train", "validation", "test", "test_ood")] == [300, 40, 60, 60]
    questions = {name: {r["question"] for r in records} for name, records in splits.items()}
    assert all(len(questions[name]) == len(splits[name]) for name in splits), "duplicates inside a split"
    names = list(splits)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            assert not questions[first] & questions[second], f"{first} and {second} share a question"


@pytest.mark.parametrize("split", ["train", "test"])
def test_in_distribution_problems_follow_the_limits_and_the_arithmetic_is_right(split):
    for record in generate_split(SMALL, split):
        operations = _operations(record)
        assert SMALL.min_steps <= len(operations) <= SMALL.max_steps == 3
        assert record["num_steps"] == len(operations)
        previous = None
        for left, symbol, operand, result in operations:
            assert previous is None or left == previous, "each step starts from the last result"
            assert operand <= SMALL.max_operand
            expected = {"+": left + operand, "-": left - operand, "*": left * operand,
                        "/": left // operand}[symbol]
            assert result == expected and result >= 0
            if symbol == "/":
                assert left % operand == 0, "division only when exact"
            if symbol in "*/":
                assert 2 <= operand <= 5
            previous = result
        assert record["final_answer"] == str(previous)
        assert record["question"].endswith("have now?")


def test_ood_split_has_more_steps_and_larger_numbers():
    in_dist = generate_split(SMALL, "test")
    ood = generate_split(SMALL, "test_ood")
    assert all(len(_operations(r)) == SMALL.ood_steps for r in ood)
    assert SMALL.ood_steps > SMALL.max_steps
    assert max(op[2] for r in ood for op in _operations(r)) > SMALL.max_operand
    assert all(op[2] <= SMALL.ood_max_operand for r in ood for op in _operations(r))
    mean_answer = lambda records: sum(int(r["final_answer"]) for r in records) / len(records)  # noqa: E731
    assert mean_answer(ood) > mean_answer(in_dist)


def test_word_problems_vary_names_objects_and_verbs():
    questions = [r["question"] for r in generate_split(SMALL, "train")]
    first_words = {q.split()[0] for q in questions}
    objects = {q.split(" has ")[1].split(".")[0].split(" ", 1)[1] for q in questions}
    assert len(first_words) >= 10 and len(objects) >= 8
    verbs = ("buys", "gives", "loses", "sells", "doubles", "triples", "splits", "shares", "finds")
    assert sum(any(v in q for q in questions) for v in verbs) >= 7


def test_unknown_split_names_the_valid_ones():
    with pytest.raises(DataError, match="test_ood"):
        generate_split(SMALL, "dev")


def test_limits_too_small_for_the_size_raise_instead_of_looping():
    tiny = SyntheticArithConfig(num_train=500, min_steps=1, max_steps=1, max_operand=2)
    with pytest.raises(DataError, match="data.synthetic.max_operand"):
        generate_split(tiny, "train")


def test_parse_final_answer_reads_the_last_answer_line():
    assert parse_final_answer("3 + 4 = 7\nThe answer is 7.") == "7"
    assert parse_final_answer("The answer is 1,234.") == "1234"
    assert parse_final_answer("The answer is 3. The answer is 5") == "5"
    assert parse_final_answer("no idea") is None
