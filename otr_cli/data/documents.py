"""Plain-text documents for language modelling (``data.format=text``): every token supervised.

No chat template: the document is tokenized as it is and the tokenizer's end-of-sequence token is
appended (as TRL does for its ``text`` format), so that a model trained on documents learns where one
ends and packed documents (``data.packing``) stay apart.
"""

from __future__ import annotations

from typing import Any

from otr_cli.data.examples import TokenizedExample


def encode_document(text: str, tokenizer: Any) -> TokenizedExample:
    """input_ids: the document's tokens plus eos (when the tokenizer has one), length T; labels == input_ids.

    Position 0 carries a label too but has no context to predict it from (TokenizedExample.num_supervised
    does not count it).
    """
    input_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        input_ids.append(int(tokenizer.eos_token_id))
    return TokenizedExample(input_ids=input_ids, labels=list(input_ids))
