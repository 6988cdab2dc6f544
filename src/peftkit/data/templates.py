"""Prompt templates and THE formatting function shared by training, evaluation, generation and serving.

Training may sample among a task's phrasings; everything after training uses the canonical
(first) phrasing recorded in the adapter's `peftkit.json`, so a shipped adapter formats
prompts exactly as it was trained.

Example:
    >>> fmt = PromptFormat(templates=["Summarize:\\n\\n{abstract}"], chat=True)
    >>> text = format_prompt(tokenizer, fmt, {"abstract": "We study ..."})
"""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, Mapping

import yaml

from ..errors import ConfigError, DataError


@lru_cache(maxsize=1)
def builtin_templates() -> dict[str, list[str]]:
    """The shipped task templates (peftkit/templates/tasks.yaml)."""
    text = resources.files("peftkit").joinpath("templates/tasks.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def template_fields(template: str) -> list[str]:
    """The `{column}` names a template reads."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError as exc:
        raise ConfigError(f"template {template!r} is malformed ({exc}); use {{column}} and double braces for literals")


@dataclass
class PromptFormat:
    """How a row becomes the prompt text: phrasings over columns, optionally in the chat template."""

    templates: list[str] = field(default_factory=lambda: ["{prompt}"])
    """Phrasings over row columns; [0] is canonical (used after training)."""
    chat: bool = True
    """Wrap in the tokenizer's chat template when it has one."""
    system_prompt: str | None = None
    """System message for chat templates (None keeps the template's default)."""

    def render(self, row: Mapping[str, Any], phrasing: int = 0) -> str:
        template = self.templates[phrasing % len(self.templates)]
        try:
            return template.format_map(_Row(row))
        except KeyError as exc:
            raise DataError(f"template {template!r} needs column {exc.args[0]!r}; the row has {sorted(row)}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "PromptFormat":
        return cls(**{k: raw[k] for k in ("templates", "chat", "system_prompt") if k in raw})

    @classmethod
    def resolve(cls, template: str | None, prompt_column: str, chat: bool, system_prompt: str | None) -> "PromptFormat":
        """A built-in task name, a literal template containing `{...}`, or just the prompt column."""
        if template is not None and template in builtin_templates():
            return cls(list(builtin_templates()[template]), chat, system_prompt)
        if template is not None:
            if not template_fields(template):
                names = ", ".join(builtin_templates())
                raise ConfigError(f"data.template {template!r} is neither a built-in ({names}) nor has {{column}} fields")
            return cls([template], chat, system_prompt)
        source = prompt_column if template_fields(prompt_column) else "{" + prompt_column + "}"
        return cls([source], chat, system_prompt)


class _Row(dict):
    def __missing__(self, key: str) -> Any:
        raise KeyError(key)


def uses_chat(tokenizer: Any, fmt: PromptFormat) -> bool:
    return bool(fmt.chat and getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer: Any, fmt: PromptFormat, row: Mapping[str, Any], phrasing: int = 0) -> str:
    """THE formatting function: row -> the exact prompt text the model sees before its answer."""
    text = fmt.render(row, phrasing)
    if not uses_chat(tokenizer, fmt):
        return text
    messages = [{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt else []
    messages.append({"role": "user", "content": text})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def response_text(tokenizer: Any, fmt: PromptFormat, prompt: str, response: str) -> str:
    """The target text that follows `prompt` (a leading space after a plain prompt ending in a word)."""
    if not uses_chat(tokenizer, fmt) and prompt and not prompt[-1].isspace():
        return " " + response
    return response


def format_chat_text(tokenizer: Any, messages: list[Mapping[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` with the chat template; return the text and the char spans of assistant turns."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("chat `messages` data needs a tokenizer with a chat template")
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = tokenizer.apply_chat_template(list(messages[:i]), tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(list(messages[: i + 1]), tokenize=False)
        spans.append((len(before), len(through)))
    text = tokenizer.apply_chat_template(list(messages), tokenize=False)
    return text, spans
