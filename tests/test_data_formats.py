"""Records to chat messages: messages, prompt/completion, question/answer maps, and their errors."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import pytest

from otr_cli.config import DataConfig
from otr_cli.data import DataError, prompt_messages, read_source, to_messages
from otr_cli.data.formats import detect_format

GSM8K_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


def test_gsm8k_question_answer_map_on_the_real_file(tmp_path):
    if not GSM8K_TRAIN.is_file():
        pytest.skip(f"{GSM8K_TRAIN} not present")
    sample = tmp_path / "gsm8k_head.jsonl"
    with open(GSM8K_TRAIN) as handle:
        sample.write_text("".join(islice(handle, 3)))
    records = read_source(str(sample), "train")
    cfg = DataConfig(source=str(sample), format="question_answer")
    messages = to_messages(records[0], cfg)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"].startswith("Natalia sold clips to 48 of her friends")
    assert messages[1]["content"].endswith("#### 72")
    assert detect_format(records[0], DataConfig(), "x") == "question_answer"


def test_auto_detects_each_format_from_the_fields():
    cfg = DataConfig()
    assert detect_format({"messages": []}, cfg, "r") == "messages"
    assert detect_format({"prompt": "p", "completion": "c"}, cfg, "r") == "prompt_completion"
    assert detect_format({"question": "q", "answer": "a"}, cfg, "r") == "question_answer"
    renamed = DataConfig(question_field="Question", answer_field="Answer")
    assert detect_format({"Question": "q", "Answer": 1.0}, renamed, "r") == "question_answer"


def test_auto_with_unknown_fields_lists_them_and_the_keys_to_set():
    with pytest.raises(DataError) as info:
        to_messages({"Body": "b", "Question": "q", "Answer": 3.0}, DataConfig(), where="svamp.jsonl:4")
    message = str(info.value)
    assert message.startswith("svamp.jsonl:4:")
    assert "'Body', 'Question', 'Answer'" in message
    assert "data.format=question_answer" in message and "data.question_field" in message


def test_messages_format_passes_roles_through():
    record = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                           {"role": "assistant", "content": "A"}]}
    assert to_messages(record, DataConfig()) == record["messages"]


def test_sharegpt_from_value_messages_are_mapped_to_roles():
    record = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    cfg = DataConfig(format="messages", messages_field="conversations")
    assert to_messages(record, cfg) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_prompt_completion_strings_become_user_and_assistant_with_the_system_prompt():
    cfg = DataConfig(system_prompt="Be brief.")
    assert to_messages({"prompt": "2+2?", "completion": "4"}, cfg) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]


def test_conversational_prompt_completion_is_concatenated():
    record = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}
    assert to_messages(record, DataConfig()) == record["prompt"] + record["completion"]


def test_numeric_answers_become_plain_text():
    cfg = DataConfig(question_field="Question", answer_field="Answer")
    assert to_messages({"Question": "q", "Answer": 145.0}, cfg)[-1]["content"] == "145"
    assert to_messages({"Question": "q", "Answer": 2.5}, cfg)[-1]["content"] == "2.5"


def test_missing_field_names_the_field_the_key_to_set_and_the_fields_present(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n{"question": "q2", "solution": "s"}\n')
    records = read_source(str(path), "train")
    cfg = DataConfig(format="question_answer")
    with pytest.raises(DataError) as info:
        to_messages(records[1], cfg, where=records.where(1))
    message = str(info.value)
    assert f"{path}:2" in message
    assert "missing field 'answer'" in message and "data.answer_field=" in message
    assert "'question', 'solution'" in message


@pytest.mark.parametrize("record, cfg, where_hint", [
    ({"question": "q", "answer": "   "}, DataConfig(), "message 1"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": ""}]}, DataConfig(),
     "message 1"),
    ({"prompt": "p", "completion": "\n"}, DataConfig(system_prompt="S"), "message 2"),
])
def test_empty_assistant_message_says_where(record, cfg, where_hint):
    with pytest.raises(DataError, match=rf"^data\.jsonl:7: empty assistant message \({where_hint}\)"):
        to_messages(record, cfg, where="data.jsonl:7")


def test_malformed_messages_are_refused_with_the_message_index():
    with pytest.raises(DataError, match="message 1 of field 'messages' has keys"):
        to_messages({"messages": [{"role": "user", "content": "u"}, {"text": "x"}]}, DataConfig())
    with pytest.raises(DataError, match="should be a list of messages"):
        to_messages({"messages": "hello"}, DataConfig())
    with pytest.raises(DataError, match="starts with an assistant message"):
        to_messages({"messages": [{"role": "assistant", "content": "x"}]}, DataConfig())


def test_prompt_messages_stop_before_the_last_reply():
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    assert prompt_messages(messages) == messages[:3]
    assert prompt_messages(messages[:1]) == messages[:1]
