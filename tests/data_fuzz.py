"""Random bad data files for tests/test_data_fuzz.py: each case is a file's bytes plus the data.* settings.

`make_case(rng)` draws one case from a fixed mixture of the mistakes real data sets have: wrong JSON shapes,
wrong types in messages, missing or unknown roles, empty or missing turns, no reply, every reply weighted 0,
every example longer than data.max_length, empty files, invalid UTF-8, a JSON array in a .jsonl file, CSV
with missing columns, parquet with the wrong column types. Deterministic for a given `random.Random`.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Case:
    name: str  # what was done, for the failure message
    suffix: str  # the file type: .jsonl, .json, .csv, .parquet
    content: bytes
    settings: dict[str, Any] = field(default_factory=dict)  # data.* keys besides data.source


ODD_VALUES: list[Any] = [None, 0, 7, -1.5, True, "", "   ", [], {}, ["a", "b"], {"text": "hi"}, [1, 2], "x" * 3,
                         float("inf")]


def good_messages(rng: random.Random) -> list[dict]:
    turns = [{"role": "user", "content": f"What is {rng.randint(1, 9)} + {rng.randint(1, 9)}?"},
             {"role": "assistant", "content": f"It is {rng.randint(2, 18)}."}]
    if rng.random() < 0.3:
        turns.insert(0, {"role": "system", "content": "You add numbers."})
    return turns


def _odd(rng: random.Random) -> Any:
    value = rng.choice(ODD_VALUES)
    return None if isinstance(value, float) and value != value else value


def _break_message(rng: random.Random, messages: list[dict]) -> str:
    """Change one thing in a messages list in place; returns what was changed."""
    index = rng.randrange(len(messages))
    message = messages[index]
    kind = rng.choice(["content", "role", "no_role", "no_content", "message", "extra", "weight", "sharegpt"])
    if kind == "content":
        message["content"] = _odd(rng)
    elif kind == "role":
        message["role"] = rng.choice(["robot", "", None, 3, "ASSISTANT", "tool", "function", ["user"]])
    elif kind == "no_role":
        message.pop("role")
    elif kind == "no_content":
        message.pop("content")
    elif kind == "message":
        messages[index] = _odd(rng)
    elif kind == "extra":
        message[rng.choice(["name", "tool_calls", "id"])] = _odd(rng)
    elif kind == "weight":
        message["weight"] = _odd(rng)
    else:
        messages[index] = {"from": rng.choice(["human", "gpt", "bot", None]), "value": _odd(rng)}
    return f"{kind} of message {index}"


def _record_mistake(rng: random.Random) -> tuple[str, dict | Any]:
    kind = rng.choice(["messages", "messages", "messages", "shape", "turns", "prompt_completion",
                       "question_answer", "top"])
    if kind == "messages":
        messages = good_messages(rng)
        what = _break_message(rng, messages)
        return what, {"messages": messages}
    if kind == "shape":
        return "messages not a list", {"messages": _odd(rng)}
    if kind == "turns":
        choice = rng.choice(["empty", "user only", "system only", "assistant first", "two users", "empty reply"])
        messages = {"empty": [], "user only": [{"role": "user", "content": "hi"}],
                    "system only": [{"role": "system", "content": "be nice"}],
                    "assistant first": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "yo"}],
                    "two users": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                    "empty reply": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}[choice]
        return choice, {"messages": messages}
    if kind == "prompt_completion":
        record = {"prompt": "2+2?", "completion": "4"}
        record[rng.choice(["prompt", "completion"])] = _odd(rng)
        return "prompt/completion value", record
    if kind == "question_answer":
        record = {"question": "2+2?", "answer": "4"}
        record[rng.choice(["question", "answer"])] = _odd(rng)
        return "question/answer value", record
    return "top-level value", _odd(rng)


def _jsonl(rng: random.Random) -> Case:
    good = [{"messages": good_messages(rng)} for _ in range(rng.randint(0, 4))]
    what, bad = _record_mistake(rng)
    lines = [json.dumps(r) for r in good]
    position = rng.randint(0, len(lines))
    lines.insert(position, json.dumps(bad))
    return Case(f"jsonl line {position + 1}: {what}", ".jsonl", ("\n".join(lines) + "\n").encode(),
                {"format": rng.choice(["auto", "auto", "messages"])})


def _jsonl_bytes(rng: random.Random) -> Case:
    kind = rng.choice(["empty", "blank lines", "invalid utf-8", "array", "truncated", "nul", "bom"])
    good = json.dumps({"messages": good_messages(rng)})
    content = {"empty": b"", "blank lines": b"\n \n\t\n",
               "invalid utf-8": (good + "\n").encode() + b'{"messages": "\xff\xfe"}\n',
               "array": json.dumps([{"messages": good_messages(rng)}]).encode() + b"\n",
               "truncated": (good + "\n" + good[: rng.randint(1, len(good) - 1)]).encode(),
               "nul": b"\x00" * rng.randint(1, 5) + b"\n",
               "bom": b"\xef\xbb\xbf" + good.encode() + b"\n"}[kind]
    return Case(f"jsonl bytes: {kind}", ".jsonl", content)


def _json(rng: random.Random) -> Case:
    kind = rng.choice(["object", "list of lists", "list of scalars", "empty list", "scalar", "nested"])
    payload = {"object": {"a": 1, "b": 2}, "list of lists": [[1, 2]], "list of scalars": [1, "x"],
               "empty list": [], "scalar": 5, "nested": {"data": {"rows": []}}}[kind]
    return Case(f"json: {kind}", ".json", json.dumps(payload).encode())


def _csv(rng: random.Random) -> Case:
    kind = rng.choice(["missing column", "header only", "empty", "empty cells", "extra cells", "no header"])
    content = {"missing column": "question\n2+2?\n3+3?\n", "header only": "question,answer\n", "empty": "",
               "empty cells": "question,answer\n,\n,\n", "extra cells": "question,answer\na,b,c\n",
               "no header": "2+2?,4\n"}[kind]
    settings = {"format": "question_answer"} if rng.random() < 0.5 else {}
    return Case(f"csv: {kind}", ".csv", content.encode(), settings)


def _parquet(rng: random.Random) -> Case:
    import pyarrow as pa
    import pyarrow.parquet as pq

    kind = rng.choice(["int messages", "string messages", "int content", "list answer", "null answer", "struct",
                       "empty table"])
    columns = {"int messages": {"messages": [1, 2]}, "string messages": {"messages": ["hi", "yo"]},
               "int content": {"messages": [[{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}],
                                            [{"role": "user", "content": "3"}, {"role": "assistant", "content": "4"}]]},
               "list answer": {"question": ["a", "b"], "answer": [[1, 2], [3]]},
               "null answer": {"question": ["a", "b"], "answer": [None, None]},
               "struct": {"question": [{"x": 1}, {"x": 2}], "answer": ["a", "b"]},
               "empty table": {"question": pa.array([], pa.string()), "answer": pa.array([], pa.string())}}[kind]
    table = pa.table(columns)
    if kind == "int content":
        table = pa.table({"messages": [[{"role": "user", "content": 1}, {"role": "assistant", "content": 2}]] * 2})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return Case(f"parquet: {kind}", ".parquet", sink.getvalue())


def _lengths(rng: random.Random) -> Case:
    """Every example too long for data.max_length, or every reply weighted 0: nothing to train on."""
    kind = rng.choice(["too long, drop", "reply after the cut", "all weights 0"])
    records = [{"messages": good_messages(rng)} for _ in range(3)]
    settings: dict[str, Any] = {}
    if kind == "too long, drop":
        settings = {"max_length": 8, "truncation": "drop"}
    elif kind == "reply after the cut":
        settings = {"max_length": 8, "truncation": "truncate"}
    else:
        for record in records:
            for message in record["messages"]:
                if message["role"] == "assistant":
                    message["weight"] = 0
    return Case(f"lengths: {kind}", ".jsonl", "".join(json.dumps(r) + "\n" for r in records).encode(), settings)


MAKERS: list[Callable[[random.Random], Case]] = [_jsonl] * 6 + [_jsonl_bytes, _json, _csv, _parquet, _lengths]


def make_case(rng: random.Random) -> Case:
    return rng.choice(MAKERS)(rng)
