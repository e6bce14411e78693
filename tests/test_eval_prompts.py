"""Prompts: zero-shot CoT asking for \\boxed{}, lettered options, code in a block, chat-rendered."""

from otr_cli.eval.benchmarks import Problem
from otr_cli.eval.prompts import MATH_INSTRUCTION, chat_messages, render_prompts, user_message


def test_math_prompt_asks_for_the_answer_in_boxed():
    text = user_message(Problem("1", "What is 2+3?", "5"), "math_cot")
    assert text.startswith("What is 2+3?") and text.endswith(MATH_INSTRUCTION) and "\\boxed{}" in text


def test_choice_prompt_lists_lettered_options_and_asks_for_a_boxed_letter():
    problem = Problem("1", "Pick one.", 1, "choice", {"choices": ["red", "green", "blue"]})
    text = user_message(problem, "choice_cot")
    assert "A. red\nB. green\nC. blue" in text and "\\boxed{A}" in text


def test_code_prompt_shows_the_signature_in_a_python_block():
    text = user_message(Problem("t", "def f(x):\n    \"\"\"Double x.\"\"\"\n", "", "code"), "code")
    assert "```python\ndef f(x):" in text and "whole function" in text


def test_plain_prompt_is_the_question_as_trained():
    assert user_message(Problem("1", "Sam has 3 apples.", "3"), "plain") == "Sam has 3 apples."


def test_system_prompt_comes_first_and_prompts_end_with_the_assistant_turn(tokenizer):
    problem = Problem("1", "What is 2+3?", "5")
    assert chat_messages(problem, "math_cot", "Be brief.")[0] == {"role": "system", "content": "Be brief."}
    [prompt] = render_prompts([problem], "math_cot", tokenizer, "Be brief.")
    assert "Be brief." in prompt and prompt.endswith("<|im_start|>assistant\n")
