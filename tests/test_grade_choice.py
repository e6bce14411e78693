"""Multiple-choice grading: the letter a completion chose, and gold given as letter or index."""

import pytest

from otr_cli.eval.choice_grader import extract_choice, gold_letter, grade_choice


@pytest.mark.parametrize("completion, letter", [
    ("The answer is (B).", "B"),
    ("Answer: C", "C"),
    (r"Therefore \boxed{D}", "D"),
    (r"\boxed{\text{A}}", "A"),
    (r"\boxed{(C)}", "C"),
    ("I pick option B because it is larger.", "B"),
    ("A. amnion", "A"),
    ("Between (A) and (C), I choose (C).", "C"),
    ("the answer is: **D**", "D"),
    ("So the correct answer is B.", "B"),
    ("An apple a day", None),
    ("The answer is a tricky one", None),
])
def test_choice_extraction_reads_the_usual_phrasings(completion, letter):
    assert extract_choice(completion) == letter


def test_gold_may_be_a_letter_or_a_zero_based_index():
    assert [gold_letter(g) for g in (0, 2, "b", "(D)", " C ")] == ["A", "C", "B", "D", "C"]


@pytest.mark.parametrize("bad", [True, 11, "maybe", ""])
def test_bad_gold_is_rejected_with_its_value(bad):
    with pytest.raises(ValueError, match="gold"):
        gold_letter(bad)


def test_grade_choice_compares_letters():
    assert grade_choice("The answer is (B)", 1) == ("B", True)
    assert grade_choice("The answer is (B)", "C") == ("B", False)
    assert grade_choice("no idea", "C") == (None, False)


@pytest.mark.parametrize("completion", [
    # Real SmolLM2 completions from the study (MMLU-STEM): the model echoed the options instead of choosing.
    "A. amnion\nB. chorion\nC. allantois\nD. yolk sac\n",
    "A. A DNA or RNA primer and reverse transcriptase\nB. A DNA or RNA primer and DNA polymerase\nC. x\nD. y",
    "A. B.",
])
def test_an_echoed_option_list_is_no_answer(completion):
    # Before: the last listed letter (D) was read as the choice, a free 25% on every echo.
    assert extract_choice(completion) is None


def test_a_single_letter_line_still_counts_beside_other_text():
    assert extract_choice("C. reduce the carrying capacity\n\nStep-by-step process:\n\n1. Determine") == "C"
    assert extract_choice("A. B.\nThe answer is (B)") == "B"  # an explicit phrasing wins over the echo
