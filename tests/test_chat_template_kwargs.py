"""data.chat_template_kwargs and eval.chat_template_kwargs: checked at start-up, passed to every rendering.

The template is Qwen3's (tests/chat_templates.py) assigned to a copy of the real SmolLM2 tokenizer, as a
Qwen3 checkpoint's tokenizer would carry it: data.chat_template stays unset.
"""

from __future__ import annotations

import copy
import json

import pytest

from chat_templates import QWEN3_TEMPLATE
from helpers import SHARED_DATA, read_jsonl
from otr_cli.cli import main
from otr_cli.config import ConfigError, DataConfig, EvalConfig, TrainConfig, validate, validate_data
from otr_cli.data import IGNORE_INDEX, build_datasets
from otr_cli.eval.benchmarks import Problem
from otr_cli.eval.prompts import prompt_template_kwargs, render_prompts

EMPTY_THINK_PROMPT_END = "<|im_start|>assistant\n<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def qwen3_tokenizer(tokenizer):
    qwen3 = copy.deepcopy(tokenizer)
    qwen3.chat_template = QWEN3_TEMPLATE
    return qwen3


def _supervised_text(tokenizer, example) -> list[str]:
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs, current = runs + [tokenizer.decode(current)], []
    return runs + ([tokenizer.decode(current)] if current else [])


@pytest.mark.parametrize("value, message", [
    (["enable_thinking"], r"data.chat_template_kwargs=\['enable_thinking'\] must be a mapping of chat template "
                          r"variables to values, e.g. data.chat_template_kwargs='\{enable_thinking: false\}'"),
    ("enable_thinking=false", r"data.chat_template_kwargs='enable_thinking=false' must be a mapping"),
    ({1: True}, r"data.chat_template_kwargs has the key 1 \(int\); template variable names are strings"),
    ({"add_generation_prompt": True}, r"data.chat_template_kwargs.add_generation_prompt is an argument otr passes"),
])
def test_chat_template_kwargs_must_be_a_mapping(value, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        validate_data(DataConfig(chat_template_kwargs=value))


def test_eval_chat_template_kwargs_are_checked_at_start_up():
    with pytest.raises(ConfigError, match="^eval.chat_template_kwargs=5 must be a mapping"):
        validate(TrainConfig(eval=EvalConfig(chat_template_kwargs=5)))


def test_chat_template_kwargs_of_the_wrong_type_on_the_command_line_name_the_key(capsys):
    with pytest.raises(SystemExit):
        main(["train", "data.chat_template_kwargs=5", "dry_run=true"])
    assert "data.chat_template_kwargs" in capsys.readouterr().err


def test_qwen8b_math_trains_and_evaluates_in_non_thinking_mode(capsys):
    main(["train", "recipe=qwen8b_math", "dry_run=true"])
    out = capsys.readouterr().out
    # Once in data, once in eval.
    assert out.count("chat_template_kwargs:\n    enable_thinking: false\n") == 2


def test_one_template_variable_can_be_set_on_the_command_line(capsys):
    main(["train", "recipe=qwen8b_math", "eval.chat_template_kwargs.enable_thinking=true", "dry_run=true"])
    out = capsys.readouterr().out
    assert "chat_template_kwargs:\n    enable_thinking: false\n" in out
    assert "chat_template_kwargs:\n    enable_thinking: true\n" in out


def test_build_datasets_renders_with_data_chat_template_kwargs(qwen3_tokenizer, tmp_path):
    conversation = [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"},
                    {"role": "user", "content": "And 2 + 2?"}, {"role": "assistant", "content": "It is 4."}]
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": conversation}) + "\n")
    thinking_off = DataConfig(source=str(path), chat_template_kwargs={"enable_thinking": False})
    [example] = build_datasets(thinking_off, qwen3_tokenizer, seed=0).train
    assert _supervised_text(qwen3_tokenizer, example) == ["2<|im_end|>", "It is 4.<|im_end|>"]
    assert EMPTY_THINK_PROMPT_END + "It is 4." in qwen3_tokenizer.decode(example.input_ids)
    # Without the variable the model is taught to write the (empty) think block itself.
    [default] = build_datasets(DataConfig(source=str(path)), qwen3_tokenizer, seed=0).train
    assert _supervised_text(qwen3_tokenizer, default)[1] == "<think>\n\n</think>\n\nIt is 4.<|im_end|>"


def test_eval_prompts_use_data_chat_template_kwargs_and_eval_overrides_them():
    trained_without_thinking = DataConfig(chat_template_kwargs={"enable_thinking": False})
    assert prompt_template_kwargs(EvalConfig(), trained_without_thinking) == {"enable_thinking": False}
    assert prompt_template_kwargs(EvalConfig(chat_template_kwargs={"enable_thinking": True}),
                                  trained_without_thinking) == {"enable_thinking": True}
    assert prompt_template_kwargs(EvalConfig(chat_template_kwargs={"enable_thinking": False}),
                                  DataConfig()) == {"enable_thinking": False}
    with pytest.raises(ConfigError, match="^eval.chat_template_kwargs=.* must be a mapping"):
        prompt_template_kwargs(EvalConfig(chat_template_kwargs=["enable_thinking"]), DataConfig())


def test_eval_prompts_end_with_the_empty_think_block_in_non_thinking_mode(qwen3_tokenizer):
    problem = Problem("1", "What is 2+3?", "5")
    [thinking_off] = render_prompts([problem], "math_cot", qwen3_tokenizer,
                                    chat_template_kwargs={"enable_thinking": False})
    [thinking_on] = render_prompts([problem], "math_cot", qwen3_tokenizer)
    assert thinking_off.endswith(EMPTY_THINK_PROMPT_END)
    assert thinking_on.endswith("<|im_start|>assistant\n") and "<think>" not in thinking_on


@pytest.mark.slow
def test_otr_eval_on_its_own_reads_eval_chat_template_kwargs(tiny_model_dir, tmp_path, capsys):
    template = tmp_path / "qwen3.jinja"
    template.write_text(QWEN3_TEMPLATE)
    main(["eval", f"model={tiny_model_dir}", "eval.benchmarks=[svamp]", "eval.limit=1", "eval.max_new_tokens=2",
          f"eval.data_dir={SHARED_DATA}", f"data.chat_template={template}",
          "+eval.chat_template_kwargs={enable_thinking: false}", f"run.output_dir={tmp_path}"])
    [row] = read_jsonl(tmp_path / "eval" / "svamp.jsonl")
    assert row["prompt"].endswith(EMPTY_THINK_PROMPT_END)
