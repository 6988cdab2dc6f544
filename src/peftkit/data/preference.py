"""Preference pairs: rows of a prompt, a chosen and a rejected answer, tokenized with loss masks on the answers.

Two shapes, in any file format `read_rows` reads (.jsonl, .json, .csv, .parquet, a `datasets` folder):

- text: `prompt` (or the columns `data.template` / `data.prompt` name), `chosen`, `rejected` strings; both answers
  follow the prompt through the one formatter (`encode_prompt_response`, as supervised fine-tuning does);
- chat: `chosen` / `rejected` are message lists. Either `prompt` holds the prompt turns, or the two lists share them
  (the turns both start with); the tokenizer's chat template renders prompt + answer, labels on the answer's
  assistant turns only.

A pair whose answers are identical (nothing to prefer), or whose answer has no token left within
`data.max_length`, is counted in `PairStats`, logged, and left out: never trained on silently.

The built-in `aclsum/outcome-preference` pairs each aclsum paper's abstract (prompt) with its outcome
summary (chosen) and its challenge or approach summary (rejected, alternating by paper: a hard negative
on the same topic), on aclsum's own train / validation / test splits.

Example:
    >>> task = load_pairs(cfg.data, cfg.preference, seed=0)
    >>> pairs, stats = tokenize_pairs(task.train, tokenizer, task, max_length=512)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import DataError
from .batching import IGNORE_INDEX
from .datasets import encode_prompt_response, split_by_ratio
from .sources import aclsum_rows, read_rows
from .templates import PromptFormat, format_chat_text, template_fields

log = logging.getLogger(__name__)

BUILTIN_PAIRS = {"aclsum/outcome-preference": ("outcome", ("challenge", "approach"))}
"""Built-in pair datasets: {name: (chosen aspect, rejected aspects taken in turn by paper)}."""


@dataclass
class PairTask:
    """A pair dataset's splits, its shape and prompt format."""

    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    test: list[dict[str, Any]]
    format: PromptFormat
    shape: str = "text"
    """text | chat"""
    chosen: str = "chosen"
    rejected: str = "rejected"
    prompt: str = "prompt"
    """The prompt column of chat rows (absent: the turns both answers start with)."""
    name: str = "pairs"


@dataclass
class PairStats:
    pairs: int = 0
    identical: int = 0
    """Pairs whose two answers are the same text (nothing to prefer)."""
    empty: int = 0
    """Pairs with an answer that has no token left within max_length."""
    truncated_prompts: int = 0

    def report(self, what: str, max_length: int) -> None:
        """Log every pair left out, and why."""
        if self.identical:
            log.warning("%s: %d pair(s) have identical chosen and rejected answers and were left out", what, self.identical)
        if self.empty:
            log.warning("%s: %d pair(s) have an answer with no token within data.max_length=%d and were left out; "
                        "raise data.max_length", what, self.empty, max_length)
        if self.truncated_prompts:
            log.warning("%s: %d prompt(s) were cut in the middle to fit data.max_length=%d", what, self.truncated_prompts, max_length)

    def to_dict(self) -> dict[str, int]:
        return {"pairs": self.pairs, "identical": self.identical, "empty": self.empty, "truncated_prompts": self.truncated_prompts}


# -- reading -------------------------------------------------------------------------------------
def aclsum_pair_rows(split: str, name: str) -> list[dict[str, Any]]:
    """Rows {id, abstract, chosen, rejected} of a built-in pair dataset on one aclsum split."""
    chosen_aspect, rejected_aspects = BUILTIN_PAIRS[name]
    chosen = aclsum_rows(split, chosen_aspect)
    others = [aclsum_rows(split, aspect) for aspect in rejected_aspects]
    return [
        {"id": row["id"], "abstract": row["abstract"], "chosen": row["summary"],
         "rejected": others[i % len(others)][i]["summary"]}
        for i, row in enumerate(chosen)
    ]


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, (str, list)) and not (value.strip() if isinstance(value, str) else value))


def check_pair_rows(rows: Sequence[Mapping[str, Any]], needed: Sequence[str], task: PairTask, source: str) -> None:
    """Every row has the prompt fields and both answers, non-empty; chat rows hold message lists."""
    for i, row in enumerate(rows):
        for column in needed:
            if column not in row:
                raise DataError(f"{source}: row {i + 1} has no column {column!r} (columns: {', '.join(map(str, row))}); "
                                "preference rows need prompt / chosen / rejected: set data.prompt, preference.chosen / "
                                "preference.rejected, or map them with data.columns")
            if _empty(row[column]):
                raise DataError(f"{source}: row {i + 1}, column {column!r} is empty; fill it or remove the row")
        if task.shape == "chat":
            for column in (task.chosen, task.rejected):
                if not _is_messages(row[column]) or not any(m["role"] == "assistant" for m in row[column]):
                    raise DataError(f"{source}: row {i + 1}, column {column!r} must be a list of {{role, content}} "
                                    "messages with an assistant turn (as in the chosen column)")


def load_pairs(data: Any, preference: Any, seed: int) -> PairTask:
    """The pair dataset of `data` (a built-in name or files), split and checked."""
    if data.train is None:
        if data.dataset not in BUILTIN_PAIRS:
            raise DataError(f"data.dataset {data.dataset!r} has no answer pairs; choose one of {', '.join(BUILTIN_PAIRS)}")
        fmt = PromptFormat.resolve(data.template or "summarize_outcome", "abstract", data.chat_template, data.system_prompt)
        splits = [aclsum_pair_rows(split, data.dataset) for split in ("train", "validation", "test")]
        return PairTask(*splits, fmt, "text", name=data.dataset)
    train = read_rows(data.train, data.columns)
    validation = read_rows(data.validation, data.columns) if data.validation else []
    test = read_rows(data.test, data.columns) if data.test else []
    if not test and data.test_ratio > 0:
        train, test = split_by_ratio(train, data.test_ratio, seed)
    if not validation and data.val_ratio > 0:
        train, validation = split_by_ratio(train, data.val_ratio / max(1e-9, 1 - data.test_ratio), seed + 1)
    chat = isinstance(train[0].get(preference.chosen), list)
    fmt = PromptFormat.resolve(data.template, data.prompt, data.chat_template, data.system_prompt)
    task = PairTask(train, validation, test, fmt, "chat" if chat else "text", preference.chosen, preference.rejected,
                    data.prompt, Path(data.train).stem)
    needed = [preference.chosen, preference.rejected] if chat else [*template_fields(fmt.templates[0]), preference.chosen, preference.rejected]
    for split, rows in (("train", train), ("validation", validation), ("test", test)):
        check_pair_rows(rows, needed, task, f"{getattr(data, split) or data.train} ({split})")
    if not train:
        raise DataError(f"{data.train}: the training split has no pairs")
    return task


# -- tokenizing ----------------------------------------------------------------------------------
def chat_turns(row: Mapping[str, Any], task: PairTask) -> tuple[list, list, list]:
    """(prompt turns, chosen turns, rejected turns) of a chat row."""
    chosen, rejected = list(row[task.chosen]), list(row[task.rejected])
    prompt = row.get(task.prompt)
    if _is_messages(prompt):
        return list(prompt), chosen, rejected
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


def encode_chat_answer(tokenizer: Any, prompt: list, answer: list, max_length: int) -> dict[str, list[int]]:
    """prompt + answer turns through the chat template; labels on the answer's assistant turns only."""
    text, spans = format_chat_text(tokenizer, prompt + answer)
    spans = spans[sum(m["role"] == "assistant" for m in prompt):]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [tok if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
              for tok, (start, _) in zip(enc["input_ids"], enc["offset_mapping"])]
    return {"input_ids": enc["input_ids"][:max_length], "labels": labels[:max_length]}


def encode_pair(tokenizer: Any, task: PairTask, row: Mapping[str, Any], max_length: int, stats: PairStats) -> tuple[dict, dict] | None:
    """(chosen example, rejected example) of one row; None (counted in `stats`) when the pair cannot be used."""
    if task.shape == "chat":
        prompt, chosen_turns, rejected_turns = chat_turns(row, task)
        if chosen_turns == rejected_turns:
            stats.identical += 1
            return None
        examples = [encode_chat_answer(tokenizer, prompt, turns, max_length) for turns in (chosen_turns, rejected_turns)]
    else:
        if str(row[task.chosen]).strip() == str(row[task.rejected]).strip():
            stats.identical += 1
            return None
        examples, cut = [], False
        for column in (task.chosen, task.rejected):
            example, truncated = encode_prompt_response(tokenizer, task.format, row, column, max_length)
            examples.append(example)
            cut = cut or truncated
        stats.truncated_prompts += cut
    if any(e is None or all(label == IGNORE_INDEX for label in e["labels"]) for e in examples):
        stats.empty += 1
        return None
    return examples[0], examples[1]


def tokenize_pairs(rows: Sequence[Mapping[str, Any]], tokenizer: Any, task: PairTask, max_length: int,
                   split: str = "train") -> tuple[list[dict[str, Any]], PairStats]:
    """Tokenized pairs {chosen, rejected, row}; identical and empty pairs are counted, logged and left out."""
    stats = PairStats()
    pairs = []
    for i, row in enumerate(rows):
        encoded = encode_pair(tokenizer, task, row, max_length, stats)
        if encoded is not None:
            pairs.append({"chosen": encoded[0], "rejected": encoded[1], "row": i})
    stats.pairs = len(pairs)
    stats.report(f"{task.name} ({split})", max_length)
    return pairs, stats


__all__ = ["BUILTIN_PAIRS", "PairStats", "PairTask", "aclsum_pair_rows", "encode_pair", "load_pairs", "tokenize_pairs"]
