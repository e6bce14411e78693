"""Render conversations with a chat template and mark which tokens carry the loss.

Supervised tokens are exactly what the model must write after the generation prompt: each
assistant message's rendered content and the token that closes the turn (``<|im_end|>`` in
ChatML), which is what teaches the model to stop. Everything else (system prompt, including
one the template injects by itself, user turns, the ``<|im_start|>assistant\\n`` header, the
newline after the end-of-turn token) has label -100.

How the spans are found, for any template: for the assistant message i,
``render(messages[:i], add_generation_prompt=True)`` ends where the reply starts and
``render(messages[:i + 1])`` ends where the turn ends; the reply span is the text between them
with trailing whitespace removed. That needs the turn to be *prefix-stable* (both renderings are
prefixes of the full rendering), as every turn of SmolLM2's or ChatML's template is.

Templates with a thinking mode are not: Qwen3's writes an earlier reply without its reasoning and
without a think block, but the same reply as the last message (or after the generation prompt
with enable_thinking=false) with one. For such a turn the reply is located in the full rendering,
the text the model trains on: its content (as is, trimmed, or without the reasoning up to
``</think>``) followed by what the template writes to close the turn (``<|im_end|>``), the
occurrence nearest to where the full rendering stops agreeing with the generation prompt, after
the previous reply. A reply found nowhere is an error that names the message.

Template variables (``chat_template_kwargs``, e.g. ``{"enable_thinking": False}``) reach every
rendering. Characters map to tokens through the fast tokenizer's offset mapping. Labels are never
derived from token ids: SmolLM2's pad token is its end-of-turn token, so ``input_ids ==
pad_token_id`` would hide exactly the tokens that teach the model to stop.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

from otr_cli.data.errors import DataError
from otr_cli.data.examples import IGNORE_INDEX, TokenizedExample

# Built-in templates for models whose tokenizer has none (base models): data.chat_template=chatml.
BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}


def _tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def resolve_chat_template(tokenizer: Any, chat_template: Optional[str] = None) -> Optional[str]:
    """The template to pass to ``apply_chat_template``: None means the tokenizer's own.

    chat_template: a Jinja template string (contains ``{{`` or ``{%``), a built-in name
        (``chatml``), or a path to a file holding a template.
    Raises DataError when neither the setting nor the tokenizer provides a template.
    """
    if chat_template:
        if "{{" in chat_template or "{%" in chat_template:
            return chat_template
        if chat_template in BUILTIN_TEMPLATES:
            return BUILTIN_TEMPLATES[chat_template]
        path = Path(chat_template).expanduser()
        if not path.is_file():
            raise DataError(f"data.chat_template={chat_template!r} is not a Jinja template (no '{{{{' or '{{%'), "
                            f"not a built-in name ({', '.join(BUILTIN_TEMPLATES)}) and not an existing file")
        return path.read_text(encoding="utf-8")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"tokenizer {_tokenizer_name(tokenizer)!r} has no chat template; set data.chat_template "
                        f"to a Jinja template string, a template file, or a built-in name "
                        f"({', '.join(BUILTIN_TEMPLATES)})")
    return None


def render(messages: list[dict], tokenizer: Any, template: Optional[str], *, add_generation_prompt: bool,
           where: str = "conversation", chat_template_kwargs: Optional[Mapping[str, Any]] = None) -> str:
    """The conversation as text (special tokens included), rendered by the chat template.

    chat_template_kwargs: extra template variables (data.chat_template_kwargs), e.g. enable_thinking.
    """
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             **dict(chat_template_kwargs or {}))
    except DataError:
        raise
    except Exception as exc:  # jinja errors and template-raised exceptions ("roles must alternate")
        raise DataError(f"{where}: the chat template failed to render this conversation: {exc}") from exc
    if not isinstance(text, str):
        raise DataError(f"{where}: apply_chat_template returned {type(text).__name__}, not text")
    return text


def render_prompt(messages: list[dict], tokenizer: Any, chat_template: Optional[str] = None,
                  chat_template_kwargs: Optional[Mapping[str, Any]] = None) -> str:
    """Prompt text for generation: `messages` rendered with the generation prompt appended.

    Tokenize the result with ``add_special_tokens=False``: the template already wrote them.
    """
    template = resolve_chat_template(tokenizer, chat_template)
    return render(messages, tokenizer, template, add_generation_prompt=True,
                  chat_template_kwargs=chat_template_kwargs)


def _reply_forms(content: Any) -> list[str]:
    """How a template may write an assistant message's content, most literal first.

    As is; trimmed (templates that ``| trim``); without the reasoning up to the last ``</think>``
    (templates that drop earlier turns' thinking: Qwen3, DeepSeek-R1), newlines or all whitespace
    around it removed.
    """
    if not isinstance(content, str):
        return []
    forms = [content, content.strip()]
    if "</think>" in content:
        answer = content.split("</think>")[-1]
        forms += [answer.lstrip("\n"), answer.strip()]
    return [form for form in dict.fromkeys(forms) if form]


def _locate_reply(full: str, before: str, through: str, message: dict, index: int, search_from: int,
                  where: str) -> tuple[int, int]:
    """The [start, end) span of assistant message `index` in `full` for a turn that is not prefix-stable.

    before: the conversation up to the reply with the generation prompt; through: up to and
    including the reply, where the reply is the last message. The span is the reply's content as
    `full` writes it plus what closes the turn (the text `through` writes after the content,
    trailing whitespace excluded: ``<|im_end|>``). Of its occurrences after `search_from` (the end
    of the previous reply), the last one starting where `full` still agrees with `before` wins (the
    reply starts right after the header the two share), else the first one after that point.
    """
    agree = len(os.path.commonprefix([before, full]))
    closing = through.rstrip()
    for reply in _reply_forms(message.get("content")):
        at = closing.rfind(reply)
        if at == -1:
            continue
        target = reply + closing[at + len(reply):]
        start = full.rfind(target, search_from, max(search_from, agree) + len(target))
        if start == -1:
            start = full.find(target, max(search_from, agree))
        if start != -1:
            return start, start + len(target)
    raise DataError(
        f"{where}: the chat template is not prefix-stable and the content of assistant message {index} does not "
        f"appear in the full rendering after the previous reply (neither as is, trimmed, nor without its "
        f"reasoning up to '</think>'), so the tokens to supervise cannot be located. Set data.chat_template to a "
        f"template that writes each reply's content unchanged (e.g. data.chat_template=chatml)"
    )


def assistant_spans(messages: list[dict], tokenizer: Any, template: Optional[str], where: str = "conversation",
                    chat_template_kwargs: Optional[Mapping[str, Any]] = None) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the [start, end) character span of every assistant reply in it.

    A span starts after the generation prompt and ends after the end-of-turn marker (trailing
    whitespace excluded). Turns that are not prefix-stable are located in the full rendering
    (``_locate_reply``); raises DataError when a reply cannot be found there.
    """
    def render_part(part: list[dict], add_generation_prompt: bool) -> str:
        return render(part, tokenizer, template, add_generation_prompt=add_generation_prompt, where=where,
                      chat_template_kwargs=chat_template_kwargs)

    full = render_part(messages, False)
    spans: list[tuple[int, int]] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_part(messages[:index], True)
        # The last message's prefix is the whole conversation: skip one render (a third of the cost).
        last = index == len(messages) - 1
        through = full if last else render_part(messages[: index + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            spans.append(_locate_reply(full, before, through, message, index, spans[-1][1] if spans else 0, where))
            continue
        end = len(through.rstrip())
        if end <= len(before):
            raise DataError(f"{where}: the chat template rendered assistant message {index} as nothing")
        spans.append((len(before), end))
    return full, spans


def _encode_with_offsets(text: str, tokenizer: Any):
    try:
        return tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as exc:
        raise DataError(f"tokenizer {_tokenizer_name(tokenizer)!r} gives no character offsets; a fast "
                        f"(Rust-backed) tokenizer is needed to build assistant-only labels") from exc


def _weighted_encoding(text: str, spans: list[tuple[int, int]], reply_weights: list[float],
                       tokenizer: Any) -> TokenizedExample:
    """Like the unweighted path, but each token takes the weight of the reply span it overlaps."""
    encoding = _encode_with_offsets(text, tokenizer)
    input_ids: list[int] = list(encoding["input_ids"])
    # Per character: the index of the reply span + 1 (0: outside every reply); spans do not overlap.
    reply_at = [0] * (len(text) + 1)
    for number, (start, end) in enumerate(spans, start=1):
        reply_at[start:end] = [number] * (end - start)
    labels: list[int] = []
    weights: list[float] = []
    for token, (start, end) in zip(input_ids, encoding["offset_mapping"]):
        reply = next((number for number in reply_at[start:end] if number), 0)
        weight = reply_weights[reply - 1] if reply else 0.0
        labels.append(token if weight > 0 else IGNORE_INDEX)
        weights.append(weight)
    return TokenizedExample(input_ids=input_ids, labels=labels, weights=weights)


def encode_conversation(messages: list[dict], tokenizer: Any, template: Optional[str], where: str = "conversation",
                        chat_template_kwargs: Optional[Mapping[str, Any]] = None,
                        reply_weights: Optional[list[float]] = None) -> TokenizedExample:
    """Tokens of the rendered conversation; labels supervise the assistant spans only.

    A token is supervised when its characters overlap an assistant span. A token that straddles
    the start of a reply (a SentencePiece "▁word" whose offset includes the space the prompt
    ends with) is part of what the model must write, so it is supervised rather than lost.
    reply_weights: one per assistant message, in order (None: all 1). A reply of weight 0 is
    context: its tokens keep label -100. Other weights go to ``TokenizedExample.weights``.
    """
    text, spans = assistant_spans(messages, tokenizer, template, where, chat_template_kwargs)
    if reply_weights is not None and any(weight != 1.0 for weight in reply_weights):
        return _weighted_encoding(text, spans, reply_weights, tokenizer)
    encoding = _encode_with_offsets(text, tokenizer)
    input_ids: list[int] = list(encoding["input_ids"])
    in_reply = bytearray(len(text) + 1)  # 1 at characters inside an assistant span
    for start, end in spans:
        in_reply[start:end] = b"\x01" * (end - start)
    labels = [
        token if in_reply.find(1, start, end) != -1 else IGNORE_INDEX
        for token, (start, end) in zip(input_ids, encoding["offset_mapping"])
    ]
    return TokenizedExample(input_ids=input_ids, labels=labels)
