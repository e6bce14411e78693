"""Turn one raw record into chat messages ``[{"role": ..., "content": ...}, ...]``.

Formats (``data.format``):

- ``messages``: ``record[data.messages_field]`` is a list of ``{"role", "content"}`` dicts
  (ShareGPT's ``{"from": "human"|"gpt", "value"}`` is accepted too).
- ``prompt_completion``: ``record[data.prompt_field]`` is the user turn and
  ``record[data.completion_field]`` the assistant reply; each may also be a list of messages
  (TRL's conversational prompt/completion).
- ``question_answer``: ``record[data.question_field]`` / ``record[data.answer_field]`` as one
  user turn and one assistant reply (GSM8K: question / answer).
- ``alpaca``: ``record[data.instruction_field]`` and, when present and not empty,
  ``record[data.input_field]`` joined by one newline as the user turn (as LLaMA-Factory joins
  them), ``record[data.output_field]`` the reply; a ``system`` field opens the conversation.
- ``text``: ``record[data.text_field]`` is a document for language modelling: no chat template,
  every token supervised (``text_document``, encoded by data/pipeline.py, not by to_messages).
- ``auto``: the first of those whose fields the record has (messages also under ShareGPT's
  ``conversations`` field).

``data.system_prompt`` (when set) opens prompt/completion and question/answer conversations.
An assistant message may carry ``"weight"`` (0: context, not a target; see ``data/weights.py``).
"""

from __future__ import annotations

import math

from typing import Any, Optional

from otr_cli.data.errors import DataError
from otr_cli.data.weights import TURN_WEIGHT_KEY, turn_weight

FORMAT_FIELD_KEYS = {
    "messages": ("messages_field",),
    "prompt_completion": ("prompt_field", "completion_field"),
    "question_answer": ("question_field", "answer_field"),
    "alpaca": ("instruction_field", "output_field"),
    "text": ("text_field",),
}
# ShareGPT files keep their conversations here; looked at when data.messages_field is not in the record.
SHAREGPT_FIELD = "conversations"
# An alpaca record's own system prompt (LLaMA-Factory's "system" column).
ALPACA_SYSTEM_FIELD = "system"
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "tool": "tool"}


def _field_list(record: dict) -> str:
    return ", ".join(repr(key) for key in record) or "none"


def detect_format(record: dict, data_cfg: Any, where: str) -> str:
    """The format of `record` under data.format (resolving "auto" from the fields present)."""
    if data_cfg.format != "auto":
        if data_cfg.format not in FORMAT_FIELD_KEYS:
            raise DataError(f"data.format={data_cfg.format!r} is not one of auto, {', '.join(FORMAT_FIELD_KEYS)}")
        return data_cfg.format
    for name, keys in FORMAT_FIELD_KEYS.items():
        if all(getattr(data_cfg, key) in record for key in keys):
            return name
        if name == "messages" and SHAREGPT_FIELD in record:
            return name
    raise DataError(
        f"{where}: cannot tell the format of this record (data.format=auto); it has fields {_field_list(record)}. "
        f"Set data.format=messages (field data.messages_field={data_cfg.messages_field!r}), "
        f"prompt_completion (data.prompt_field={data_cfg.prompt_field!r}, data.completion_field="
        f"{data_cfg.completion_field!r}), question_answer (data.question_field={data_cfg.question_field!r}, "
        f"data.answer_field={data_cfg.answer_field!r}), alpaca (data.instruction_field="
        f"{data_cfg.instruction_field!r}, data.output_field={data_cfg.output_field!r}) or text (data.text_field="
        f"{data_cfg.text_field!r}), e.g. data.format=question_answer "
        f"data.question_field=Question data.answer_field=Answer"
    )


def _field(record: dict, data_cfg: Any, key: str, fmt: str, where: str) -> Any:
    name = getattr(data_cfg, key)
    if name not in record:
        raise DataError(f"{where}: missing field {name!r} needed by data.format={fmt}; set data.{key}=<field> "
                        f"to read another field. The record has fields: {_field_list(record)}")
    return record[name]


def _as_text(value: Any, key: str, name: str, where: str) -> str:
    """A text field; numbers (SVAMP's answers are floats) become their plain decimal form."""
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        raise DataError(f"{where}: field {name!r} (data.{key}) should be text, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise DataError(f"{where}: field {name!r} (data.{key}) should be text, got the number {value!r}")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _message(item: Any, index: int, name: str, where: str) -> dict:
    if not isinstance(item, dict):
        raise DataError(f"{where}: message {index} of field {name!r} should be an object with role and content, "
                        f"got {type(item).__name__}")
    if "role" in item and "content" in item:
        role, content = item["role"], item["content"]
    elif "from" in item and "value" in item:
        role, content = _SHAREGPT_ROLES.get(item["from"], item["from"]), item["value"]
    else:
        raise DataError(f"{where}: message {index} of field {name!r} has keys {sorted(item)}; "
                        f"expected 'role' and 'content'")
    if not isinstance(role, str) or not role.strip():
        raise DataError(f"{where}: message {index} of field {name!r}: role should be text such as 'user' or "
                        f"'assistant', got {role!r}")
    if not isinstance(content, str):
        raise DataError(f"{where}: message {index} of field {name!r} ({role}): content should be text, got "
                        f"{type(content).__name__} (multimodal parts and tool calls are not supported)")
    message = {"role": role, "content": content}
    weight = turn_weight(item, role, index, where)
    if weight is not None:
        message[TURN_WEIGHT_KEY] = weight
    return message


def _messages(value: Any, key: str, name: str, where: str) -> list[dict]:
    if not isinstance(value, list):
        raise DataError(f"{where}: field {name!r} (data.{key}) should be a list of messages, "
                        f"got {type(value).__name__}")
    return [_message(item, index, name, where) for index, item in enumerate(value)]


def _without_weights(messages: list[dict]) -> list[dict]:
    return [{key: value for key, value in message.items() if key != TURN_WEIGHT_KEY} for message in messages]


def _check_conversation(messages: list[dict], where: str) -> None:
    if not messages:
        raise DataError(f"{where}: the conversation has no messages")
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if not message["content"].strip():
            raise DataError(f"{where}: empty assistant message (message {index}); remove the record or "
                            f"fill in the reply")
        if index == 0:
            raise DataError(f"{where}: the conversation starts with an assistant message; it needs a user "
                            f"turn (the prompt) before the first reply")


def to_messages(record: dict, data_cfg: Any, *, record_format: Optional[str] = None,
                where: str = "record", keep_weights: bool = False) -> list[dict]:
    """Chat messages of `record`.

    record_format: the record's format; defaults to data.format (``auto`` detects from the fields).
    where: the record's location (``file:line``) for error messages.
    keep_weights: keep an assistant message's ``"weight"`` (checked either way) for training.
    Raises DataError on missing fields, wrong types and empty assistant messages.
    """
    fmt = record_format or detect_format(record, data_cfg, where)
    system = [{"role": "system", "content": data_cfg.system_prompt}] if data_cfg.system_prompt else []
    if fmt == "messages":
        if data_cfg.messages_field not in record and SHAREGPT_FIELD in record:
            messages = _messages(record[SHAREGPT_FIELD], "messages_field", SHAREGPT_FIELD, where)
        else:
            messages = _messages(_field(record, data_cfg, "messages_field", fmt, where), "messages_field",
                                 data_cfg.messages_field, where)
    elif fmt == "prompt_completion":
        prompt = _field(record, data_cfg, "prompt_field", fmt, where)
        completion = _field(record, data_cfg, "completion_field", fmt, where)
        if isinstance(prompt, list):
            prompt_messages = _messages(prompt, "prompt_field", data_cfg.prompt_field, where)
        else:
            prompt_messages = [{"role": "user", "content": _as_text(prompt, "prompt_field", data_cfg.prompt_field,
                                                                    where)}]
        if isinstance(completion, list):
            completion_messages = _messages(completion, "completion_field", data_cfg.completion_field, where)
        else:
            completion_messages = [{"role": "assistant", "content": _as_text(
                completion, "completion_field", data_cfg.completion_field, where)}]
        has_system = prompt_messages and prompt_messages[0]["role"] == "system"
        messages = ([] if has_system else system) + prompt_messages + completion_messages
    elif fmt == "question_answer":
        question = _as_text(_field(record, data_cfg, "question_field", fmt, where), "question_field",
                            data_cfg.question_field, where)
        answer = _as_text(_field(record, data_cfg, "answer_field", fmt, where), "answer_field",
                          data_cfg.answer_field, where)
        messages = system + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    elif fmt == "alpaca":
        messages = _alpaca_messages(record, data_cfg, system, where)
    elif fmt == "text":
        raise DataError(f"{where}: data.format=text is a document for language modelling, not a conversation; "
                        f"it has no prompt to ask a model (use a chat format for evaluation prompts)")
    else:
        raise DataError(f"data.format={fmt!r} is not one of auto, {', '.join(FORMAT_FIELD_KEYS)}")
    _check_conversation(messages, where)
    return messages if keep_weights else _without_weights(messages)


def _alpaca_messages(record: dict, data_cfg: Any, system: list[dict], where: str) -> list[dict]:
    """Instruction and input joined by one newline (LLaMA-Factory's join) as the user turn, output the reply."""
    fmt = "alpaca"
    instruction = _as_text(_field(record, data_cfg, "instruction_field", fmt, where), "instruction_field",
                           data_cfg.instruction_field, where)
    extra = record.get(data_cfg.input_field)
    extra = "" if extra is None else _as_text(extra, "input_field", data_cfg.input_field, where)
    output = _as_text(_field(record, data_cfg, "output_field", fmt, where), "output_field",
                      data_cfg.output_field, where)
    own_system = record.get(ALPACA_SYSTEM_FIELD)
    if own_system is not None and _as_text(own_system, "system_prompt", ALPACA_SYSTEM_FIELD, where).strip():
        system = [{"role": "system", "content": str(own_system)}]
    prompt = "\n".join(part for part in (instruction, extra) if part)
    return system + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def text_document(record: dict, data_cfg: Any, where: str) -> str:
    """The document of a ``text`` record (data.text_field); empty text is a DataError."""
    text = _as_text(_field(record, data_cfg, "text_field", "text", where), "text_field", data_cfg.text_field, where)
    if not text.strip():
        raise DataError(f"{where}: field {data_cfg.text_field!r} (data.text_field) is empty; remove the record "
                        f"or fill in the text")
    return text


def prompt_messages(messages: list[dict]) -> list[dict]:
    """The messages before the last assistant turn: what a model is asked at evaluation time."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index]["role"] == "assistant":
            return messages[:index]
    return list(messages)
