"""What an export needs so that the model is prompted as it was trained: the chat template and its stop token.

The run renders its data with data.chat_template (or the tokenizer's own template). A base model's
tokenizer has none, so an export that saved the tokenizer unchanged would leave vLLM and
``apply_chat_template`` without the template the model learnt; and a generation that stops only at
the base model's end-of-text token would run past the end of the turn the model learnt to write
(``<|im_end|>`` in ChatML). So every export saves the template the run used, and its
``generation_config.json`` lists the template's end-of-turn token among the eos ids.

Template variables (data.chat_template_kwargs, e.g. enable_thinking) cannot be stored with the
tokenizer: whoever prompts the model passes them to ``apply_chat_template`` as the run did.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from otr_cli.data.chat import assistant_spans, resolve_chat_template
from otr_cli.data.errors import DataError

# A reply no template rewrites, to find what the template writes after a reply's content.
_PROBE_REPLY = "otr-probe-reply"


@dataclass(frozen=True)
class ChatExport:
    """template: the chat template the run rendered with; end_of_turn_id: the token that closes an
    assistant turn in it (None: the template closes a turn with text of several tokens, or none)."""

    template: str
    end_of_turn_id: Optional[int]


def chat_export_for(tokenizer: Any, chat_template: Optional[str],
                    chat_template_kwargs: Optional[Mapping[str, Any]] = None) -> ChatExport:
    """The template a run with data.chat_template=`chat_template` renders with, and its end-of-turn token."""
    template = resolve_chat_template(tokenizer, chat_template) or tokenizer.chat_template
    return ChatExport(template=template, end_of_turn_id=_end_of_turn_id(tokenizer, template, chat_template_kwargs))


def _end_of_turn_id(tokenizer: Any, template: str, chat_template_kwargs: Optional[Mapping[str, Any]]) -> Optional[int]:
    """The one token the template writes right after an assistant reply's content (``<|im_end|>``)."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_REPLY}]
    try:
        text, spans = assistant_spans(probe, tokenizer, template, chat_template_kwargs=chat_template_kwargs)
    except DataError:  # a template that refuses this conversation (one that needs a system turn): no stop token
        return None
    reply = text[spans[0][0]:spans[0][1]]
    closing = reply[reply.rfind(_PROBE_REPLY) + len(_PROBE_REPLY):] if _PROBE_REPLY in reply else ""
    ids = tokenizer(closing, add_special_tokens=False)["input_ids"] if closing else []
    return ids[0] if len(ids) == 1 else None


def save_tokenizer_with_template(tokenizer: Any, target_dir: Path, chat: Optional[ChatExport]) -> None:
    """``tokenizer.save_pretrained`` with the run's template; the run's own tokenizer is left as it is."""
    if chat is not None and chat.template != getattr(tokenizer, "chat_template", None):
        tokenizer = copy.copy(tokenizer)  # shallow: only the template attribute differs
        tokenizer.chat_template = chat.template
    tokenizer.save_pretrained(target_dir)


def add_stop_token(target_dir: Path, model_config: Any, tokenizer: Any, chat: Optional[ChatExport]) -> None:
    """Make `target_dir`'s generation_config.json stop at the end of a turn as well as at eos."""
    from transformers import GenerationConfig

    if chat is None or chat.end_of_turn_id is None:
        return
    target_dir = Path(target_dir)
    if (target_dir / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(target_dir)
    else:
        generation = GenerationConfig.from_model_config(model_config)
    eos = generation.eos_token_id
    ids = list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
    before = list(ids)
    ids += [token for token in (tokenizer.eos_token_id, chat.end_of_turn_id) if token is not None]
    ids = list(dict.fromkeys(ids))
    if ids == before and (target_dir / "generation_config.json").is_file():
        return  # the model stops there already
    generation.eos_token_id = ids[0] if len(ids) == 1 else ids
    generation.save_pretrained(target_dir)
