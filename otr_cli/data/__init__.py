"""Data for training and evaluation: sources, formats, chat rendering, label masks, batches.

Public interface (what training and evaluation import)::

    build_datasets(data_cfg, tokenizer, seed) -> DataBundle(train, validation, report)
    collate_batch(examples, pad_token_id) -> {"input_ids", "attention_mask", "labels", "weights", "sequence_index"}
    collate_packed(examples, pad_token_id, row_capacity) -> the same keys + "position_ids", packed rows
    load_records(source_or_data_cfg, split) -> list[dict]
    to_messages(record, data_cfg) -> list[{"role", "content"}]
    prompt_messages(messages) -> the messages before the last assistant reply
    render_prompt(messages, tokenizer, chat_template=None, chat_template_kwargs=None) -> str
    generate_split(synthetic_cfg, split) / parse_final_answer(text)   (synthetic_arith)

See docs/data.md for the user-facing description.
"""

from otr_cli.data.chat import encode_conversation, render_prompt, resolve_chat_template
from otr_cli.data.collate import collate_batch
from otr_cli.data.packing import collate_packed
from otr_cli.data.errors import DataError
from otr_cli.data.examples import IGNORE_INDEX, DataBundle, DataReport, TokenizedExample
from otr_cli.data.formats import prompt_messages, to_messages
from otr_cli.data.pipeline import build_datasets
from otr_cli.data.sources import load_records, read_source
from otr_cli.data.synthetic_arith import generate_split, parse_final_answer

__all__ = [
    "IGNORE_INDEX",
    "DataBundle",
    "DataError",
    "DataReport",
    "TokenizedExample",
    "build_datasets",
    "collate_batch",
    "collate_packed",
    "encode_conversation",
    "generate_split",
    "load_records",
    "parse_final_answer",
    "prompt_messages",
    "read_source",
    "render_prompt",
    "resolve_chat_template",
    "to_messages",
]
