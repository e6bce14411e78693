"""Prompts: zero-shot chain of thought asking for the final answer in \\boxed{}, rendered with the chat template.

Styles:
    math_cot   -- the question, then "Please reason step by step, and put your final answer within \\boxed{}."
    choice_cot -- the question and lettered options, asking for the letter in \\boxed{}.
    code       -- the function signature and docstring, asking for the completed function in a code block.
    plain      -- the question as is (synthetic_arith: the format the model was trained on).
Few-shot (eval.few_shot, gsm8k): worked examples as earlier user/assistant turns, answers boxed.
Template variables (``prompt_template_kwargs``): data.chat_template_kwargs with eval.chat_template_kwargs
over it, so a model trained in Qwen3's non-thinking mode is asked in it too unless eval says otherwise.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from otr_cli.config import check_chat_template_kwargs
from otr_cli.eval.benchmarks import Problem
from otr_cli.eval.choice_grader import LETTERS

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = ("Think step by step, then give the letter of the correct option as your final answer "
                      "within \\boxed{}, for example \\boxed{A}.")
CODE_INSTRUCTION = ("Complete the following Python function. Reply with the whole function, including the "
                    "signature and any imports it needs, in one ```python code block.")


def user_message(problem: Problem, style: str) -> str:
    """The user turn for `problem` in prompt `style`."""
    if style == "plain":
        return problem.question
    if style == "math_cot":
        return f"{problem.question.strip()}\n\n{MATH_INSTRUCTION}"
    if style == "choice_cot":
        choices = problem.extra.get("choices") or []
        options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(choices))
        return f"{problem.question.strip()}\n\n{options}\n\n{CHOICE_INSTRUCTION}"
    if style == "code":
        return f"{CODE_INSTRUCTION}\n\n```python\n{problem.question.rstrip()}\n```"
    raise ValueError(f"unknown prompt style {style!r}")


def chat_messages(problem: Problem, style: str, system_prompt: Optional[str] = None,
                  examples: Sequence[tuple[str, str]] = ()) -> list[dict[str, str]]:
    """System prompt, then each few-shot example as a user/assistant exchange, then the question."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for question, solution in examples:
        example = Problem("example", question, "")
        messages += [{"role": "user", "content": user_message(example, style)},
                     {"role": "assistant", "content": solution}]
    return messages + [{"role": "user", "content": user_message(problem, style)}]


def prompt_template_kwargs(eval_cfg: Any, data_cfg: Any) -> dict[str, Any]:
    """The chat template variables of evaluation prompts: data.chat_template_kwargs (the training
    text's), each replaced or joined by eval.chat_template_kwargs.

    Raises ConfigError naming the key when either is not a mapping with string keys.
    """
    return (check_chat_template_kwargs("data.chat_template_kwargs", data_cfg.chat_template_kwargs)
            | check_chat_template_kwargs("eval.chat_template_kwargs", eval_cfg.chat_template_kwargs))


def render_prompts(problems: list[Problem], style: str, tokenizer: Any, system_prompt: Optional[str] = None,
                   chat_template: Optional[str] = None, examples: Sequence[tuple[str, str]] = (),
                   chat_template_kwargs: Optional[Mapping[str, Any]] = None) -> list[str]:
    """Chat-rendered prompt texts (generation prompt appended), one per problem."""
    from otr_cli.data import render_prompt

    return [render_prompt(chat_messages(p, style, system_prompt, examples), tokenizer, chat_template,
                          chat_template_kwargs)
            for p in problems]
