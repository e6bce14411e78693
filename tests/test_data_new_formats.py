"""alpaca, text and ShareGPT `conversations` records through build_datasets: what is supervised, auto-detection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from otr_cli.config import DataConfig
from otr_cli.data import IGNORE_INDEX, DataError, build_datasets, collate_packed
from otr_cli.data.formats import detect_format


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _supervised_text(example, tokenizer) -> str:
    return tokenizer.decode([token for token, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


def _build(path: Path, tokenizer, **settings):
    return build_datasets(DataConfig(source=str(path), cache=False, shuffle=False, **settings), tokenizer, seed=0)


def test_alpaca_supervises_the_output_and_asks_instruction_plus_input(tokenizer, tmp_path):
    path = _jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Name a prime.", "input": "", "output": "Seven", "system": "Answer in one word."},
    ])
    bundle = _build(path, tokenizer)
    assert bundle.report.format == "alpaca"
    first, second = bundle.train[0], bundle.train[1]
    assert _supervised_text(first, tokenizer) == "Bonjour<|im_end|>"
    assert _supervised_text(second, tokenizer) == "Seven<|im_end|>"
    first_text = tokenizer.decode(first.input_ids)
    assert "<|im_start|>user\nTranslate to French.\nGood morning<|im_end|>" in first_text
    second_text = tokenizer.decode(second.input_ids)
    assert "<|im_start|>system\nAnswer in one word.<|im_end|>" in second_text
    assert "<|im_start|>user\nName a prime.<|im_end|>" in second_text  # an empty input adds no newline


def test_alpaca_without_output_names_the_line_and_the_key(tokenizer, tmp_path):
    path = _jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "i", "output": "o"}, {"instruction": "i", "out": "o"}])
    with pytest.raises(DataError, match=rf"{path}:2: missing field 'output'.*data.output_field"):
        _build(path, tokenizer)


def test_text_supervises_every_token_without_a_chat_template(tokenizer, tmp_path):
    documents = ["The cat sat on the mat.", "Language models predict the next token."]
    path = _jsonl(tmp_path / "text.jsonl", [{"text": document} for document in documents])
    bundle = _build(path, tokenizer)
    assert bundle.report.format == "text"
    for example, document in zip(bundle.train, documents):
        assert example.labels == example.input_ids  # every token, the appended end-of-sequence token too
        assert tokenizer.decode(example.input_ids) == document + tokenizer.eos_token
        assert "<|im_start|>" not in tokenizer.decode(example.input_ids)
    assert bundle.report.supervised_tokens == sum(len(example.input_ids) - 1 for example in bundle.train)


def test_text_works_with_packing(tokenizer, tmp_path):
    path = _jsonl(tmp_path / "text.jsonl", [{"text": f"Document number {i} is short."} for i in range(4)])
    bundle = _build(path, tokenizer, packing=True)
    examples = [bundle.train[i] for i in range(len(bundle.train))]
    batch = collate_packed(examples, tokenizer.pad_token_id, sum(len(ex.input_ids) for ex in examples))
    assert batch["input_ids"].shape[0] == 1
    # Every position is an example's own supervised token except each example's first (no context).
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == sum(len(ex.input_ids) - 1 for ex in examples)
    assert batch["position_ids"][0].tolist().count(0) == 4


def test_sharegpt_conversations_field_is_auto_detected(tokenizer, tmp_path):
    path = _jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}])
    bundle = _build(path, tokenizer)
    assert bundle.report.format == "messages"
    assert _supervised_text(bundle.train[0], tokenizer) == "Hello!<|im_end|>"


def test_auto_detects_alpaca_text_and_conversations_from_the_fields():
    cfg = DataConfig()
    assert detect_format({"instruction": "i", "input": "", "output": "o"}, cfg, "r") == "alpaca"
    assert detect_format({"instruction": "i", "output": "o"}, cfg, "r") == "alpaca"
    assert detect_format({"text": "a document"}, cfg, "r") == "text"
    assert detect_format({"conversations": []}, cfg, "r") == "messages"
    # A chat format wins over a stray text field.
    assert detect_format({"question": "q", "answer": "a", "text": "t"}, cfg, "r") == "question_answer"


def test_an_empty_text_names_the_line(tokenizer, tmp_path):
    path = _jsonl(tmp_path / "text.jsonl", [{"text": "fine"}, {"text": "  "}])
    with pytest.raises(DataError, match=rf"{path}:2: field 'text' \(data.text_field\) is empty"):
        _build(path, tokenizer)


def test_text_needs_no_chat_template(tokenizer, tmp_path, monkeypatch):
    path = _jsonl(tmp_path / "text.jsonl", [{"text": "A base model's tokenizer has no chat template."}])
    monkeypatch.setattr(tokenizer, "chat_template", None)
    bundle = _build(path, tokenizer, format="text")
    assert bundle.train[0].labels == bundle.train[0].input_ids
