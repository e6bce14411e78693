"""Math grading: answer extraction and equivalence on hand-made pairs."""

import pytest

from otr_cli.eval.math_grader import extract_math_answer, gold_from_gsm8k, grade_math, math_answers_match

EQUIVALENT = [
    ("0.5", r"\frac{1}{2}"),
    ("1,000", "1000"),
    ("1,234,567.5", "1234567.5"),
    (r"\sqrt{117}", r"3\sqrt{13}"),
    ("(1, 2)", "(1,2)"),
    (r"30^\circ", "30"),
    (r"30^{\circ}", "30"),
    ("x = 5", "5"),
    (r"\dfrac{3}{4}", "0.75"),
    (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt3}{2}"),
    (r"50\%", "50"),
    (r"\$18", "18"),
    ("18 dollars", "18"),
    (r"10\text{ cm}", "10"),
    ("-3", "-3.0"),
    ("1/2", "0.5"),
    (".5", "0.5"),
    (r"\{1,2\}", r"\{2,1\}"),
    ("[1,3)", "[1,3)"),
    ("x^2+2x+1", "(x+1)^2"),
    (r"2\pi", r"2\pi"),
    (r"\pi/2", r"\frac{\pi}{2}"),
    ("145.0", "145"),
]

NOT_EQUIVALENT = [
    ("1,2", "12"),
    ("0.5", "0.6"),
    (r"\sqrt{2}", "1.41"),
    ("(1,2)", "(2,1)"),
    ("x=6", "5"),
    ("", "5"),
    (None, "5"),
    (r"3\sqrt{13}", r"\sqrt{118}"),
    ("[1,3)", "(1,3)"),
    ("2", "-2"),
    ("1000", "100"),
    (r"\frac{1}{3}", "0.33"),
    ("x^2", "2x"),
    ("banana", "7"),
]


@pytest.mark.parametrize("predicted, gold", EQUIVALENT)
def test_equivalent_answers_match(predicted, gold):
    assert math_answers_match(predicted, gold)
    assert math_answers_match(gold, predicted)


@pytest.mark.parametrize("predicted, gold", NOT_EQUIVALENT)
def test_different_answers_do_not_match(predicted, gold):
    assert not math_answers_match(predicted, gold)


@pytest.mark.parametrize("completion, expected", [
    (r"So the answer is \boxed{\frac{1}{\sqrt{2}}}.", r"\frac{1}{\sqrt{2}}"),
    (r"First \boxed{3}, then corrected: \boxed{4}", "4"),
    (r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),
    ("The answer is 18 dollars.", "18 dollars"),
    ("The final answer is $42$.", "42"),
    ("She has 16 - 3 = 13 left.\n#### 1,234", "1,234"),
    ("I think 3 then 4, so 7 apples", "7"),
    ("It costs 3.5. Then nothing.", "3.5"),
    ("no numbers at all", None),
    (r"cut off inside \boxed{12", "12"),
])
def test_extraction_finds_the_final_answer(completion, expected):
    assert extract_math_answer(completion) == expected


def test_grade_math_returns_extracted_answer_and_verdict():
    assert grade_math(r"3 + 4 = 7, so \boxed{7}", "7") == ("7", True)
    assert grade_math("The answer is 8.", "7") == ("8", False)


def test_gsm8k_gold_is_the_number_after_hashes_without_commas():
    assert gold_from_gsm8k("He has 2 + 3 = 5\n#### 1,200") == "1200"
