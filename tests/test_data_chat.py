"""Chat rendering and assistant-only labels on the real SmolLM2 tokenizer (pad == eos == <|im_end|>)."""

from __future__ import annotations

import copy

import pytest

from chat_templates import QWEN3_TEMPLATE
from otr_cli.data import DataError, IGNORE_INDEX, collate_batch, encode_conversation, render_prompt
from otr_cli.data.chat import BUILTIN_TEMPLATES, resolve_chat_template

SINGLE_TURN = [{"role": "user", "content": "What is 2 + 3?"},
               {"role": "assistant", "content": "2 + 3 = 5\nThe answer is 5."}]
MULTI_TURN = [{"role": "system", "content": "You add numbers."},
              {"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"},
              {"role": "user", "content": "And 2 + 2?"}, {"role": "assistant", "content": "It is 4."}]
NO_THINKING = {"enable_thinking": False}


@pytest.fixture(scope="module")
def tokenizer():
    from otr_cli.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


def _supervised_runs(example):
    """Contiguous runs of supervised token ids, in order."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            assert label == token, "labels are the input ids themselves, not shifted"
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def test_the_masked_positions_are_exactly_the_prompt(tokenizer):
    example = encode_conversation(SINGLE_TURN, tokenizer, None)
    first = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    last = max(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    # Everything before the reply is the prompt the model sees at generation time...
    assert tokenizer.decode(example.input_ids[:first]) == render_prompt(SINGLE_TURN[:1], tokenizer)
    # ...everything supervised is the reply and its end-of-turn token, with no gap...
    assert all(label != IGNORE_INDEX for label in example.labels[first:last + 1])
    assert tokenizer.decode(example.input_ids[first:last + 1]) == SINGLE_TURN[1]["content"] + "<|im_end|>"
    # ...and only the newline after the end of turn follows, unsupervised.
    assert tokenizer.decode(example.input_ids[last + 1:]) == "\n"


def test_end_of_turn_is_supervised_although_it_is_the_pad_token(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    example = encode_conversation(SINGLE_TURN, tokenizer, None)
    last = max(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    assert example.labels[last] == tokenizer.pad_token_id
    batch = collate_batch([example, encode_conversation(MULTI_TURN, tokenizer, None)], tokenizer.pad_token_id)
    assert batch["labels"][0, last].item() == tokenizer.pad_token_id


def test_the_default_system_prompt_injected_by_the_template_is_rendered_and_masked(tokenizer):
    example = encode_conversation(SINGLE_TURN, tokenizer, None)
    text = tokenizer.decode(example.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert "SmolLM" not in tokenizer.decode([t for t, label in zip(example.input_ids, example.labels)
                                             if label != IGNORE_INDEX])


def test_multi_turn_supervises_every_assistant_turn_and_nothing_else(tokenizer):
    example = encode_conversation(MULTI_TURN, tokenizer, None)
    runs = [tokenizer.decode(run) for run in _supervised_runs(example)]
    assert runs == ["2<|im_end|>", "It is 4.<|im_end|>"]
    assert "You add numbers." in tokenizer.decode(example.input_ids)


def test_render_prompt_ends_with_the_generation_header(tokenizer):
    prompt = render_prompt(SINGLE_TURN[:1], tokenizer)
    assert prompt.endswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_override_as_string_file_or_builtin_name(tokenizer, tmp_path):
    plain = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token if m['role'] == 'assistant' }}"
             "\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
    example = encode_conversation(SINGLE_TURN, tokenizer, resolve_chat_template(tokenizer, plain))
    assert [tokenizer.decode(run) for run in _supervised_runs(example)] == [SINGLE_TURN[1]["content"] + "<|im_end|>"]
    assert tokenizer.decode(example.input_ids).startswith("[user] What is")

    template_file = tmp_path / "template.jinja"
    template_file.write_text(plain)
    assert resolve_chat_template(tokenizer, str(template_file)) == plain
    assert render_prompt(SINGLE_TURN[:1], tokenizer, str(template_file)) == "[user] What is 2 + 3?\n[assistant] "
    # The built-in ChatML has no default system prompt.
    assert render_prompt(SINGLE_TURN[:1], tokenizer, "chatml").startswith("<|im_start|>user\n")
    assert resolve_chat_template(tokenizer, "chatml") == BUILTIN_TEMPLATES["chatml"]
    with pytest.raises(DataError, match="data.chat_template='nope.jinja'.*not an existing file"):
        resolve_chat_template(tokenizer, "nope.jinja")


def test_tokenizer_without_chat_template_asks_for_data_chat_template(tokenizer):
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(DataError, match="has no chat template; set data.chat_template"):
        resolve_chat_template(bare, None)
    with pytest.raises(DataError, match="has no chat template"):
        render_prompt(SINGLE_TURN[:1], bare)
    assert resolve_chat_template(bare, "chatml")


def test_template_that_is_not_prefix_stable_has_its_replies_located_in_the_full_rendering(tokenizer):
    # Writes the number of messages first, so a prefix of the conversation renders differently.
    unstable = ("{{ messages | length }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                "{{ eos_token if m['role'] == 'assistant' }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    example = encode_conversation(MULTI_TURN, tokenizer, unstable)
    assert tokenizer.decode(example.input_ids).startswith("5<system>")
    assert [tokenizer.decode(run) for run in _supervised_runs(example)] == ["2<|im_end|>", "It is 4.<|im_end|>"]


def test_reply_the_template_does_not_write_is_a_clear_error(tokenizer):
    # Upper-cases replies and is not prefix-stable: the reply's content is nowhere in the rendering.
    shouting = ("{{ messages | length }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | upper }}"
                "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    with pytest.raises(DataError, match=r"^gsm8k\.jsonl:3: the chat template is not prefix-stable and the content "
                                        r"of assistant message 1 does not appear.*data.chat_template"):
        encode_conversation(SINGLE_TURN, tokenizer, shouting, where="gsm8k.jsonl:3")


def test_template_errors_say_where(tokenizer):
    failing = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError, match="^a.jsonl:1: the chat template failed.*roles must alternate"):
        encode_conversation(SINGLE_TURN, tokenizer, failing, where="a.jsonl:1")


def test_collate_pads_right_with_pad_id_and_ignores_padding_in_labels(tokenizer):
    short = encode_conversation(SINGLE_TURN, tokenizer, None)
    long = encode_conversation(SINGLE_TURN + MULTI_TURN[1:], tokenizer, None)
    batch = collate_batch([short, long], pad_token_id=tokenizer.pad_token_id)
    n, m = len(short.input_ids), len(long.input_ids)
    assert m > n
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].shape == (2, m) and str(batch[key].dtype) == "torch.int64"
    assert batch["input_ids"][0, :n].tolist() == short.input_ids
    assert batch["input_ids"][0, n:].tolist() == [tokenizer.pad_token_id] * (m - n)
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (m - n)
    assert batch["labels"][0].tolist() == short.labels + [IGNORE_INDEX] * (m - n)
    assert batch["labels"][1].tolist() == long.labels and batch["attention_mask"][1].sum() == m


def test_a_token_straddling_the_start_of_the_reply_is_supervised_not_lost(tokenizer):
    # The generation prompt ends with a space that BPE glues to the reply's first word (" 2").
    spaced = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token if m['role'] == 'assistant' }}"
              "\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    conversation = [{"role": "user", "content": "Spell 5."}, {"role": "assistant", "content": "Five."}]
    example = encode_conversation(conversation, tokenizer, spaced)
    assert " Five" in [tokenizer.decode([token]) for token in example.input_ids]
    [reply] = [tokenizer.decode(run) for run in _supervised_runs(example)]
    assert reply == " Five.<|im_end|>"


def _first_supervised_of_run(example, run_index):
    """Position of the first token of the run_index-th supervised run."""
    starts = [i for i, label in enumerate(example.labels)
              if label != IGNORE_INDEX and (i == 0 or example.labels[i - 1] == IGNORE_INDEX)]
    return starts[run_index]


def test_qwen3_template_multi_turn_supervises_each_assistant_turn_as_rendered(tokenizer):
    example = encode_conversation(MULTI_TURN, tokenizer, QWEN3_TEMPLATE, chat_template_kwargs=NO_THINKING)
    # The text the model trains on: the earlier reply without a think block, the last with an empty one.
    assert tokenizer.decode(example.input_ids) == (
        "<|im_start|>system\nYou add numbers.<|im_end|>\n<|im_start|>user\n1 + 1?<|im_end|>\n"
        "<|im_start|>assistant\n2<|im_end|>\n<|im_start|>user\nAnd 2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nIt is 4.<|im_end|>\n")
    assert [tokenizer.decode(run) for run in _supervised_runs(example)] == ["2<|im_end|>", "It is 4.<|im_end|>"]
    # Up to the last reply, the training text is exactly the prompt evaluation renders with the same kwargs.
    last_reply = _first_supervised_of_run(example, 1)
    assert tokenizer.decode(example.input_ids[:last_reply]) == render_prompt(
        MULTI_TURN[:-1], tokenizer, QWEN3_TEMPLATE, chat_template_kwargs=NO_THINKING)


def test_qwen3_template_in_thinking_mode_supervises_the_think_block_the_model_writes(tokenizer):
    # Without enable_thinking=false the generation prompt stops at '<|im_start|>assistant\n': the model
    # writes the think block itself, so the last reply's (empty) think block is supervised with it.
    example = encode_conversation(MULTI_TURN, tokenizer, QWEN3_TEMPLATE)
    assert [tokenizer.decode(run) for run in _supervised_runs(example)] == [
        "2<|im_end|>", "<think>\n\n</think>\n\nIt is 4.<|im_end|>"]


def test_qwen3_template_drops_earlier_reasoning_and_supervises_each_reply_as_rendered(tokenizer):
    reasoned = [{"role": "user", "content": "1 + 1?"},
                {"role": "assistant", "content": "<think>\nOne more than 1.\n</think>\n\n2"},
                {"role": "user", "content": "And 2 + 2?"},
                {"role": "assistant", "content": "<think>\nTwice 2.\n</think>\n\nIt is 4."}]
    example = encode_conversation(reasoned, tokenizer, QWEN3_TEMPLATE)
    text = tokenizer.decode(example.input_ids)
    assert "One more than 1." not in text and "Twice 2." in text
    assert [tokenizer.decode(run) for run in _supervised_runs(example)] == [
        "2<|im_end|>", "<think>\nTwice 2.\n</think>\n\nIt is 4.<|im_end|>"]


def test_qwen3_template_single_turn_without_thinking_supervises_the_reply_after_the_empty_think_block(tokenizer):
    example = encode_conversation(SINGLE_TURN, tokenizer, QWEN3_TEMPLATE, chat_template_kwargs=NO_THINKING)
    first = _first_supervised_of_run(example, 0)
    assert tokenizer.decode(example.input_ids[:first]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert [tokenizer.decode(run) for run in _supervised_runs(example)] == [SINGLE_TURN[1]["content"] + "<|im_end|>"]


def test_chat_template_kwargs_reach_the_template(tokenizer):
    greeting = ("{% for m in messages %}{{ m['content'] }}{{ eos_token if m['role'] == 'assistant' }}\n{% endfor %}"
                "{% if add_generation_prompt %}{{ greeting | default('(none)') }}: {% endif %}")
    assert render_prompt(SINGLE_TURN[:1], tokenizer, greeting).endswith("(none): ")
    assert render_prompt(SINGLE_TURN[:1], tokenizer, greeting, chat_template_kwargs={"greeting": "Bot"}
                         ).endswith("Bot: ")
    assert render_prompt(SINGLE_TURN[:1], tokenizer, QWEN3_TEMPLATE, chat_template_kwargs=NO_THINKING
                         ).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert render_prompt(SINGLE_TURN[:1], tokenizer, QWEN3_TEMPLATE).endswith("<|im_start|>assistant\n")
