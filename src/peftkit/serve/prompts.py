"""Requests to token ids, through THE formatting function that training used.

- **Completions** (`prompt: str`): for an adapter, the text fills the single `{field}` of the
  template recorded in its `peftkit.json` (e.g. the abstract of `summarize_outcome`), then goes
  through `format_prompt` (the chat template too, if the adapter was trained with it) and
  `prompt_ids`, exactly as `peftkit generate` and training do. An adapter saved by another
  tool (no `peftkit.json`) gets peftkit's default `{prompt}` in the chat template. The base
  model continues the raw text (its format is `{prompt}`, no chat template).
- **Chat** (`messages`): the conversation is rendered verbatim by the tokenizer's chat template
  with the generation prompt added; an adapter trained with a system prompt gets it when
  the request sends none.

Example:
    >>> ids = completion_ids(tokenizer, adapter_format, "We study ...")
    >>> ids = chat_ids(tokenizer, adapter_format, [{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..data.datasets import prompt_ids
from ..data.templates import PromptFormat, format_prompt, template_fields
from ..errors import PeftkitError

RAW_FORMAT = PromptFormat(["{prompt}"], chat=False)
"""The base model's format: the prompt text as is."""


def completion_ids(tokenizer: Any, fmt: PromptFormat, prompt: str) -> list[int]:
    """Token ids of a completion prompt, formatted as the served model was trained."""
    fields = template_fields(fmt.templates[0])
    if len(set(fields)) != 1:
        raise PeftkitError(
            f"this adapter's template {fmt.templates[0]!r} reads fields {sorted(set(fields))}; "
            "a text prompt can fill only a template with one field"
        )
    text = format_prompt(tokenizer, fmt, {fields[0]: prompt})
    return prompt_ids(tokenizer, fmt, text)


def chat_ids(tokenizer: Any, fmt: PromptFormat, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of a conversation rendered by the tokenizer's chat template, ready for the assistant turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise PeftkitError("this model's tokenizer has no chat template; use /v1/completions")
    messages = list(messages)
    if fmt.system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": fmt.system_prompt})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt_ids(tokenizer, PromptFormat(chat=True), text)
