"""An export carries the chat template the run rendered with and stops generation at its end of turn."""

from __future__ import annotations

import copy
import json

import pytest

from otr_cli.data.chat import assistant_spans, render_prompt, resolve_chat_template
from otr_cli.train.chat_export import chat_export_for
from otr_cli.train.export import save_chat_files

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 + 4?"},
                {"role": "assistant", "content": "8"}]


@pytest.fixture()
def base_tokenizer(tokenizer):
    """SmolLM2's tokenizer as a base model's: no chat template, eos is <|endoftext|> (not the end of a turn)."""
    base = copy.deepcopy(tokenizer)
    base.chat_template = None
    base.eos_token = "<|endoftext|>"
    return base


def export(tokenizer, chat_template, directory):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig, LlamaConfig

    config = LlamaConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    config.save_pretrained(directory)
    save_chat_files(directory, tokenizer, AutoConfig.from_pretrained(directory),
                    chat_export_for(tokenizer, chat_template))
    return AutoTokenizer.from_pretrained(directory), GenerationConfig.from_pretrained(directory)


def assert_renders_as_in_training(exported, tokenizer, chat_template):
    template = resolve_chat_template(tokenizer, chat_template)
    trained_text, _ = assistant_spans(CONVERSATION, tokenizer, template)
    trained_prompt = render_prompt(CONVERSATION[:-1], tokenizer, chat_template)
    assert exported.apply_chat_template(CONVERSATION, tokenize=False) == trained_text
    assert exported.apply_chat_template(CONVERSATION[:-1], tokenize=False, add_generation_prompt=True) == trained_prompt


def eos_ids(generation) -> list[int]:
    eos = generation.eos_token_id
    return list(eos) if isinstance(eos, list) else [eos]


def test_export_of_a_model_with_its_own_template_renders_the_training_text(tokenizer, tmp_path):
    exported, generation = export(tokenizer, None, tmp_path)
    assert_renders_as_in_training(exported, tokenizer, None)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos_ids(generation)


def test_export_of_a_base_model_trained_with_chatml_carries_chatml_and_stops_at_im_end(base_tokenizer, tmp_path):
    assert base_tokenizer.chat_template is None
    exported, generation = export(base_tokenizer, "chatml", tmp_path)
    assert_renders_as_in_training(exported, base_tokenizer, "chatml")
    im_end, end_of_text = (base_tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))
    assert im_end != end_of_text
    assert set(eos_ids(generation)) == {end_of_text, im_end}
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == [end_of_text, im_end]
    assert base_tokenizer.chat_template is None  # the run's own tokenizer is left as it was


def test_export_of_a_model_trained_with_another_template_than_its_own_carries_that_one(tokenizer, tmp_path):
    template = ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}<|endoftext|>\n{% endfor %}"
                "{% if add_generation_prompt %}### assistant: {% endif %}")
    exported, generation = export(tokenizer, template, tmp_path)
    assert_renders_as_in_training(exported, tokenizer, template)
    assert exported.chat_template == template != tokenizer.chat_template
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") in eos_ids(generation)


def test_export_with_a_template_that_is_not_prefix_stable_finds_its_end_of_turn_token(base_tokenizer, tmp_path):
    from chat_templates import QWEN3_TEMPLATE

    chat = chat_export_for(base_tokenizer, QWEN3_TEMPLATE, {"enable_thinking": False})
    assert chat.end_of_turn_id == base_tokenizer.convert_tokens_to_ids("<|im_end|>")
    exported, _ = export(base_tokenizer, QWEN3_TEMPLATE, tmp_path)
    assert_renders_as_in_training(exported, base_tokenizer, QWEN3_TEMPLATE)
