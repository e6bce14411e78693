"""Loss weights from the data: data.weight_field per example, "weight" per assistant reply, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chat_templates import QWEN3_TEMPLATE
from otr_cli.config import DataConfig
from otr_cli.data import IGNORE_INDEX, DataError, build_datasets, collate_batch, encode_conversation
from otr_cli.data.weights import split_turn_weights
from otr_cli.train.batches import loss_weights

MULTI_TURN = [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "It is 2."},
              {"role": "user", "content": "And 2 + 2?"}, {"role": "assistant", "content": "It is 4."}]


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _qa(i: int, **extra) -> dict:
    return {"question": f"What is {i} + {i}?", "answer": f"It is {2 * i}.", **extra}


def _decoded_supervised(tokenizer, example) -> str:
    return tokenizer.decode([label for label in example.labels if label != IGNORE_INDEX])


def test_weight_field_scales_every_supervised_token_of_its_example(tokenizer, tmp_path):
    path = _jsonl(tmp_path / "w.jsonl", [_qa(1, w=1), _qa(2, w=2.5), _qa(3, w="0.5")])
    bundle = build_datasets(DataConfig(source=str(path), weight_field="w", shuffle=False), tokenizer, seed=0)
    plain, heavy, light = bundle.train
    assert plain.weights is None
    for example, weight in ((heavy, 2.5), (light, 0.5)):
        assert [w for w, label in zip(example.weights, example.labels) if label != IGNORE_INDEX] == \
            [weight] * sum(label != IGNORE_INDEX for label in example.labels)
        assert all(w == 0 for w, label in zip(example.weights, example.labels) if label == IGNORE_INDEX)


def test_weight_zero_example_keeps_its_place_in_the_data_order_with_no_supervised_token(tokenizer, tmp_path):
    path = _jsonl(tmp_path / "w.jsonl", [_qa(1, w=1), _qa(2, w=0), _qa(3, w=1)])
    bundle = build_datasets(DataConfig(source=str(path), weight_field="w", shuffle=False), tokenizer, seed=0)
    assert len(bundle.train) == 3
    assert bundle.train[1].num_supervised == 0 and all(label == IGNORE_INDEX for label in bundle.train[1].labels)
    assert bundle.report.kept == 3 and bundle.report.zero_weight_examples == 1
    assert bundle.report.dropped_no_supervised == 0


@pytest.mark.parametrize("value, message", [(-1, "must be >= 0"), ("heavy", "should be a number"),
                                            (True, "should be a number"), (None, "should be a number")])
def test_negative_or_non_numeric_weight_is_an_error_naming_file_and_line(tokenizer, tmp_path, value, message):
    path = _jsonl(tmp_path / "w.jsonl", [_qa(1, w=1), _qa(2, w=value)])
    with pytest.raises(DataError, match=message) as error:
        build_datasets(DataConfig(source=str(path), weight_field="w", shuffle=False), tokenizer, seed=0)
    assert f"{path}:2" in str(error.value) and "data.weight_field" in str(error.value)


def test_missing_weight_field_says_which_key_to_set(tokenizer, tmp_path):
    path = _jsonl(tmp_path / "w.jsonl", [_qa(1)])
    with pytest.raises(DataError, match=r"w.jsonl:1: missing the weight field 'w'.*data.weight_field=null"):
        build_datasets(DataConfig(source=str(path), weight_field="w"), tokenizer, seed=0)


@pytest.mark.parametrize("template", ["chatml", QWEN3_TEMPLATE], ids=["chatml", "qwen3_not_prefix_stable"])
def test_reply_marked_weight_zero_is_context_with_label_minus_100_on_every_token(tokenizer, template):
    from otr_cli.data.chat import resolve_chat_template

    resolved = resolve_chat_template(tokenizer, template)
    kwargs = {"enable_thinking": False} if template != "chatml" else None
    plain = encode_conversation(MULTI_TURN, tokenizer, resolved, chat_template_kwargs=kwargs)
    messages, reply_weights = split_turn_weights([MULTI_TURN[0], {**MULTI_TURN[1], "weight": 0}, *MULTI_TURN[2:]])
    weighted = encode_conversation(messages, tokenizer, resolved, chat_template_kwargs=kwargs,
                                   reply_weights=reply_weights)
    assert weighted.input_ids == plain.input_ids, "a weight changes labels, never the text"
    assert "It is 2." in _decoded_supervised(tokenizer, plain)
    assert "It is 2." not in _decoded_supervised(tokenizer, weighted)
    assert "It is 4." in _decoded_supervised(tokenizer, weighted)
    # Every token the plain encoding supervises in the first reply is -100 now, and nothing else changed.
    changed = [t for t, (a, b) in enumerate(zip(plain.labels, weighted.labels)) if a != b]
    assert changed and all(weighted.labels[t] == IGNORE_INDEX for t in changed)
    assert "It is 2." in tokenizer.decode([plain.labels[t] for t in changed])
    assert all(w == (1.0 if label != IGNORE_INDEX else 0.0) for w, label in zip(weighted.weights, weighted.labels))


def test_reply_weights_in_messages_data_and_sharegpt_and_the_report_counts(tokenizer, tmp_path):
    records = [
        {"messages": [MULTI_TURN[0], {**MULTI_TURN[1], "weight": 0}, *MULTI_TURN[2:]]},
        {"messages": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello.", "weight": 0.5}]},
        {"messages": [MULTI_TURN[0], {**MULTI_TURN[1], "weight": 0}]},
        {"messages": MULTI_TURN, "w": 3},
    ]
    for record, weight in zip(records, (1, 1, 1, 3)):
        record["w"] = weight
    path = _jsonl(tmp_path / "chat.jsonl", records)
    bundle = build_datasets(DataConfig(source=str(path), weight_field="w", shuffle=False), tokenizer, seed=0)
    first, half, context_only, tripled = bundle.train
    assert "It is 2." not in _decoded_supervised(tokenizer, first)
    assert {w for w, label in zip(half.weights, half.labels) if label != IGNORE_INDEX} == {0.5}
    assert context_only.num_supervised == 0
    assert {w for w, label in zip(tripled.weights, tripled.labels) if label != IGNORE_INDEX} == {3.0}
    report = bundle.report.as_dict()
    assert (report["kept"], report["zero_weight_examples"], report["weighted_examples"],
            report["context_turns"], report["weighted_turns"]) == (4, 1, 1, 2, 1)
    assert "1 examples with no loss" in "\n".join(bundle.report.summary_lines())


def test_weight_on_a_user_message_is_refused_with_the_message_index(tokenizer, tmp_path):
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": [{**MULTI_TURN[0], "weight": 0}, MULTI_TURN[1]]}])
    with pytest.raises(DataError, match=r"chat.jsonl:1: message 0 \(user\) has a \"weight\""):
        build_datasets(DataConfig(source=str(path)), tokenizer, seed=0)


def test_templates_never_see_the_weight_key(tokenizer):
    messages, weights = split_turn_weights([MULTI_TURN[0], {**MULTI_TURN[1], "weight": 0.0}])
    assert weights == [0.0] and all("weight" not in message for message in messages)


def test_truncation_cuts_the_weights_with_the_tokens(tokenizer, tmp_path):
    path = _jsonl(tmp_path / "w.jsonl", [_qa(1, w=2, answer=" ".join(f"word{i}" for i in range(60)))])
    bundle = build_datasets(DataConfig(source=str(path), weight_field="w", max_length=40), tokenizer, seed=0)
    example = bundle.train[0]
    assert len(example.weights) == len(example.labels) == 40 and bundle.report.truncated == 1


def test_collate_carries_weights_one_by_default_and_zero_on_padding(tokenizer, tmp_path):
    path = _jsonl(tmp_path / "w.jsonl", [_qa(1, w=1), _qa(22222, w=2)])
    bundle = build_datasets(DataConfig(source=str(path), weight_field="w", shuffle=False), tokenizer, seed=0)
    batch = collate_batch(bundle.train, tokenizer.pad_token_id)
    short, long_ = bundle.train
    assert batch["weights"].dtype == torch.float32
    assert torch.all(batch["weights"][0, :len(short.input_ids)] == 1)
    assert torch.all(batch["weights"][0, len(short.input_ids):] == 0)
    assert batch["weights"][1].tolist() == long_.weights


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_loss_weights_multiply_each_tokens_share_and_the_normaliser_stays_a_count(tokenizer, tmp_path, reduction):
    path = _jsonl(tmp_path / "w.jsonl", [_qa(1, w=1), _qa(2, w=3), _qa(3, w=0)])
    bundle = build_datasets(DataConfig(source=str(path), weight_field="w", shuffle=False), tokenizer, seed=0)
    batch = collate_batch(bundle.train, tokenizer.pad_token_id)
    tokens = sum(example.num_supervised for example in bundle.train)
    sequences = sum(1 for example in bundle.train if example.num_supervised)
    assert sequences == 2, "a weight-0 example is not counted"
    weighted = loss_weights(batch, reduction, tokens, sequences, replicas=1)
    unweighted = loss_weights({"labels": batch["labels"]}, reduction, tokens, sequences, replicas=1)
    assert torch.equal(weighted[0], unweighted[0])
    assert torch.allclose(weighted[1], 3 * unweighted[1])
    assert torch.all(weighted[2] == 0)
    if reduction == "token":
        assert float(unweighted.sum()) == pytest.approx(1.0)
    else:
        assert float(unweighted[1].sum()) == pytest.approx(1 / 2)
