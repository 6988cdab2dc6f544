"""Tasks (splits + template), multi-task mixtures, and tokenization with loss masks.

Three data shapes: prompt/response columns (loss on the response), a single `text` column
(plain language modelling), and chat `messages` lists (loss on every assistant turn).
EOS is appended to every target so the tuned model learns to stop.

Example:
    >>> tasks = load_tasks(cfg.data, seed=0)
    >>> examples, stats = tokenize_task_rows(tasks[0].train, tokenizer, tasks[0], max_length=512)
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import DataError
from .batching import IGNORE_INDEX
from .sources import BUILTIN_DATASETS, aclsum_rows, check_columns, check_messages, read_rows
from .templates import PromptFormat, format_chat_text, format_prompt, response_text, template_fields

log = logging.getLogger(__name__)


# -- tasks and splits -----------------------------------------------------------------------------
@dataclass
class TaskData:
    """A task's splits, its column roles and its prompt format."""

    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    test: list[dict[str, Any]]
    format: PromptFormat
    shape: str = "prompt_response"
    """prompt_response | text | messages"""
    response: str = "response"
    name: str = "custom"
    counts: dict[str, int] = field(default_factory=dict)
    weight: float = 1.0
    """Share of this task in a mixture: examples per epoch = weight x its training rows."""


@dataclass
class TaskSpec:
    """Where one task's rows come from: the fields of `data` or of one `data.mixture` entry."""

    dataset: str | None
    train: str | None
    validation: str | None
    test: str | None
    prompt: str
    response: str
    template: str | None
    columns: dict[str, str]
    weight: float = 1.0
    name: str | None = None


def split_by_ratio(rows: list[dict[str, Any]], ratio: float, seed: int) -> tuple[list, list]:
    """(kept, held out): a seeded random `ratio` of the rows is held out; both keep file order."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n = int(round(len(rows) * ratio))
    held, keep = sorted(order[:n]), sorted(order[n:])
    return [rows[i] for i in keep], [rows[i] for i in held]


def detect_shape(rows: Sequence[Mapping[str, Any]], prompt: str, response: str) -> str:
    first = rows[0]
    if "messages" in first and response not in first:
        return "messages"
    if "text" in first and response not in first and prompt not in first and not template_fields(prompt):
        return "text"
    return "prompt_response"


def _builtin_task(spec: TaskSpec, data: Any) -> TaskData:
    if spec.dataset not in BUILTIN_DATASETS:
        raise DataError(f"data.dataset {spec.dataset!r} is not built in; choose one of {', '.join(BUILTIN_DATASETS)}")
    aspect = BUILTIN_DATASETS[spec.dataset]
    fmt = PromptFormat.resolve(spec.template or f"summarize_{aspect}", "abstract", data.chat_template, data.system_prompt)
    splits = [aclsum_rows(split, aspect) for split in ("train", "validation", "test")]
    return TaskData(*splits, fmt, "prompt_response", "summary", spec.name or spec.dataset, weight=spec.weight)


def _file_task(spec: TaskSpec, data: Any, seed: int) -> TaskData:
    train = read_rows(spec.train, spec.columns)
    shape = detect_shape(train, spec.prompt, spec.response)
    validation = read_rows(spec.validation, spec.columns) if spec.validation else []
    test = read_rows(spec.test, spec.columns) if spec.test else []
    if not test and data.test_ratio > 0:
        train, test = split_by_ratio(train, data.test_ratio, seed)
    if not validation and data.val_ratio > 0:
        train, validation = split_by_ratio(train, data.val_ratio / max(1e-9, 1 - data.test_ratio), seed + 1)
    fmt = PromptFormat.resolve(spec.template, spec.prompt, data.chat_template, data.system_prompt)
    for split, rows in (("train", train), ("validation", validation), ("test", test)):
        source = f"{getattr(spec, split) or spec.train} ({split})"
        if shape == "messages":
            check_messages(rows, source)
        else:
            needed = ["text"] if shape == "text" else [*template_fields(fmt.templates[0]), spec.response]
            check_columns(rows, needed, source)
    return TaskData(train, validation, test, fmt, shape, spec.response, spec.name or Path(spec.train).stem, weight=spec.weight)


def task_specs(data: Any) -> list[TaskSpec]:
    """One spec per task: the mixture's entries, or the single task `data` describes."""
    if not data.mixture:
        return [TaskSpec(data.dataset if data.train is None else None, data.train, data.validation, data.test,
                         data.prompt, data.response, data.template, dict(data.columns))]
    return [
        TaskSpec(m.dataset, m.train, m.validation, m.test, m.prompt or data.prompt, m.response or data.response,
                 m.template, dict(m.columns or data.columns), m.weight, m.name)
        for m in data.mixture
    ]


def _load_spec(spec: TaskSpec, data: Any, seed: int) -> TaskData:
    task = _builtin_task(spec, data) if spec.dataset is not None else _file_task(spec, data, seed)
    if not task.train:
        raise DataError(f"{task.name}: the training split is empty")
    if data.max_train_examples is not None:
        task.train = random.Random(seed).sample(task.train, min(data.max_train_examples, len(task.train)))
    task.counts = {"train": len(task.train), "validation": len(task.validation), "test": len(task.test)}
    return task


def load_task(data: Any, seed: int) -> TaskData:
    """The single task of a `DataConfig` (built-in dataset or files); the first task of a mixture."""
    return _load_spec(task_specs(data)[0], data, seed)


def load_tasks(data: Any, seed: int) -> list[TaskData]:
    """Every task of a `DataConfig`: one, or each entry of `data.mixture` with its own template."""
    tasks = [_load_spec(spec, data, seed) for spec in task_specs(data)]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise DataError(f"data.mixture: task names repeat ({names}); give each entry a distinct `name`")
    return tasks


def mix_examples(per_task: Sequence[Sequence[dict]], weights: Sequence[float], seed: int) -> list[dict]:
    """One epoch's pool: each task repeated `int(weight)` times plus a seeded fraction of it."""
    rng = random.Random(seed)
    pool: list[dict] = []
    for examples, weight in zip(per_task, weights):
        whole, part = divmod(weight, 1.0)
        pool.extend(list(examples) * int(whole))
        pool.extend(rng.sample(list(examples), int(round(part * len(examples)))))
    return pool


# -- tokenization ---------------------------------------------------------------------------------
@dataclass
class TokenizeStats:
    examples: int = 0
    truncated_prompts: int = 0
    truncated_responses: int = 0
    """Targets cut at max_length (text / chat / seq2seq): trained on, but the end (and EOS) is lost."""
    dropped: int = 0
    """Examples whose response alone did not fit max_length (reported, not trained on)."""

    def report(self, what: str, max_length: int) -> None:
        """Log what truncation did (a silent cut would teach a model that never stops)."""
        if self.dropped:
            log.warning("%s: %d example(s) had no target tokens within max_length=%d and were skipped", what, self.dropped, max_length)
        if self.truncated_responses:
            log.warning("%s: %d target(s) were cut at max_length=%d (their EOS is lost)", what, self.truncated_responses, max_length)
        if self.truncated_prompts:
            log.warning("%s: %d prompt(s) were longer than max_length=%d and were cut in the middle", what, self.truncated_prompts, max_length)


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def prompt_ids(tokenizer: Any, fmt: PromptFormat, prompt: str, seq2seq: bool = False) -> list[int]:
    """Token ids of a formatted prompt: the same call for training, generation, evaluation and serving.

    A chat-templated prompt already holds its special tokens as text; a plain prompt gets the
    tokenizer's own (e.g. BOS).

    Example:
        >>> ids = prompt_ids(tokenizer, fmt, format_prompt(tokenizer, fmt, {"abstract": "..."}))
    """
    chat = bool(fmt.chat and getattr(tokenizer, "chat_template", None))
    return _encode(tokenizer, prompt, seq2seq or not chat)


def fit_prompt(prompt_ids: list[int], budget: int, tail: int = 32) -> list[int]:
    """Cut the middle of an over-long prompt, keeping its head (instruction) and tail (answer cue)."""
    if len(prompt_ids) <= budget:
        return prompt_ids
    tail = min(tail, budget // 2)
    return prompt_ids[: budget - tail] + prompt_ids[len(prompt_ids) - tail :]


def encode_prompt_response(
    tokenizer: Any, fmt: PromptFormat, row: Mapping[str, Any], response_column: str, max_length: int,
    phrasing: int = 0, train_on_prompt: bool = False, seq2seq: bool = False,
) -> tuple[dict[str, list[int]] | None, bool]:
    """One training example (input_ids, labels); (None, False) if the response cannot fit."""
    prompt = format_prompt(tokenizer, fmt, row, phrasing)
    target_ids = _encode(tokenizer, response_text(tokenizer, fmt, prompt, str(row[response_column])), False) + [tokenizer.eos_token_id]
    ids = prompt_ids(tokenizer, fmt, prompt, seq2seq)
    if seq2seq:
        return {"input_ids": fit_prompt(ids, max_length), "labels": target_ids[:max_length]}, len(ids) > max_length
    if len(target_ids) > max_length - 8:
        return None, False
    fitted = fit_prompt(ids, max_length - len(target_ids))
    labels = (fitted if train_on_prompt else [IGNORE_INDEX] * len(fitted)) + target_ids
    return {"input_ids": fitted + target_ids, "labels": labels}, len(fitted) < len(ids)


def encode_text(tokenizer: Any, text: str, max_length: int) -> dict[str, list[int]]:
    ids = (_encode(tokenizer, text, True) + [tokenizer.eos_token_id])[:max_length]
    return {"input_ids": ids, "labels": list(ids)}


def encode_messages(tokenizer: Any, messages: list[Mapping[str, str]], max_length: int, train_on_prompt: bool = False) -> dict[str, list[int]]:
    """Chat rows through the tokenizer's chat template; labels on every assistant turn."""
    text, spans = format_chat_text(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [
        tok if train_on_prompt or any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
        for tok, (start, _) in zip(ids, offsets)
    ]
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def _encode_row(
    row: Mapping[str, Any], tokenizer: Any, task: TaskData, max_length: int, phrasing: int, train_on_prompt: bool,
    seq2seq: bool, stats: TokenizeStats,
) -> dict[str, list[int]] | None:
    if task.shape == "text":
        example = encode_text(tokenizer, str(row["text"]), max_length)
        stats.truncated_responses += example["input_ids"][-1] != tokenizer.eos_token_id
        return example
    if task.shape == "messages":
        example = encode_messages(tokenizer, row["messages"], max_length, train_on_prompt)
        stats.truncated_responses += example["labels"][-1] != tokenizer.eos_token_id and any(
            label != IGNORE_INDEX for label in example["labels"])
        return example
    example, truncated = encode_prompt_response(
        tokenizer, task.format, row, task.response, max_length, phrasing, train_on_prompt, seq2seq
    )
    stats.truncated_prompts += truncated
    if example is not None and seq2seq:
        stats.truncated_responses += example["labels"][-1] != tokenizer.eos_token_id
    return example


def tokenize_task_rows(
    rows: Sequence[Mapping[str, Any]], tokenizer: Any, task: TaskData, max_length: int,
    seed: int = 0, train_on_prompt: bool = False, seq2seq: bool = False, sample_phrasings: bool = True, split: str = "train",
) -> tuple[list[dict[str, list[int]]], TokenizeStats]:
    """Tokenize rows with loss masks; phrasings are sampled per example with `seed` (else canonical).

    Each example is {input_ids, labels, task}; truncation is counted in the stats and logged.
    """
    rng = random.Random(seed)
    stats = TokenizeStats()
    out = []
    for row in rows:
        phrasing = rng.randrange(len(task.format.templates)) if sample_phrasings else 0
        example = _encode_row(row, tokenizer, task, max_length, phrasing, train_on_prompt, seq2seq, stats)
        if example is None or all(label == IGNORE_INDEX for label in example["labels"]):
            stats.dropped += 1
            continue
        out.append({**example, "task": task.name})
    stats.examples = len(out)
    stats.report(f"{task.name} ({split})", max_length)
    return out, stats


__all__ = [
    "IGNORE_INDEX", "TaskData", "TokenizeStats", "detect_shape", "encode_messages", "encode_prompt_response",
    "encode_text", "load_task", "load_tasks", "mix_examples", "prompt_ids", "split_by_ratio",
    "tokenize_task_rows",
]
