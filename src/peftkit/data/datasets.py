"""Rows from files or built-in datasets, splits, tokenization with loss masks, and collation.

Three data shapes: prompt/response columns (loss on the response), a single `text` column
(plain language modelling), and chat `messages` lists (loss on every assistant turn).
Padding is masked by length, never by token id: SmolLM2's pad id equals its EOS id, and the
EOS label must survive so the tuned model learns to stop.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from ..errors import DataError
from .templates import PromptFormat, format_chat_text, format_prompt, response_text, template_fields

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ACLSUM_ASPECTS = ("outcome", "challenge", "approach")


# -- reading --------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {lineno} is not valid JSON ({exc.msg}); each line must be one object")
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {lineno} is {type(row).__name__}, expected a JSON object")
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a list of objects (or {{\"data\": [...]}})")
    return data


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8", newline="") as f:
        return [dict(r) for r in csv.DictReader(f)]


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install 'peftkit[data]')") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises many types for damaged files
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None


def _read_saved_dataset(path: Path) -> list[dict[str, Any]]:
    try:
        from datasets import load_from_disk
    except ImportError:
        raise DataError(f"{path}: reading a datasets folder needs `datasets` (pip install 'peftkit[data]')") from None
    try:
        ds = load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: not a folder written by datasets' save_to_disk ({exc})") from None
    if hasattr(ds, "keys"):  # a DatasetDict: take its train split
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split ({list(ds.keys())}); point at one split")
        ds = ds["train"]
    return [dict(r) for r in ds]


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl / .json / .csv / .parquet file or a `datasets` save_to_disk folder."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    if path.is_dir():
        rows = _read_saved_dataset(path)
    elif path.suffix.lower() in READERS:
        try:
            rows = READERS[path.suffix.lower()](path)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); re-save the file as UTF-8") from None
    else:
        raise DataError(f"{path}: unknown data format {path.suffix!r}; use .jsonl, .json, .csv, .parquet or a datasets folder")
    if not rows:
        raise DataError(f"{path}: no rows; the file is empty")
    return rows


# -- built-in datasets ---------------------------------------------------------------------------
def _aclsum_dir() -> Path:
    spec = importlib.util.find_spec("aclsum")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the built-in aclsum tasks need the package: pip install --no-deps aclsum==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / "dataset"


def aclsum_rows(split: str, aspect: str) -> list[dict[str, Any]]:
    """aclsum papers as rows {id, abstract, summary} for one aspect (challenge / approach / outcome)."""
    file = _aclsum_dir() / f"{'val' if split == 'validation' else split}.jsonl"
    rows = []
    for raw in _read_jsonl(file):
        abstract = " ".join(raw["sentences"]["abstract"])
        rows.append({"id": raw["id"], "abstract": _detokenize(abstract), "summary": raw["summary"][aspect]})
    return rows


def _detokenize(text: str) -> str:
    """aclsum abstracts are space-tokenized ("answer extraction ." -> "answer extraction.")."""
    for a, b in ((" ,", ","), (" .", "."), (" ;", ";"), (" :", ":"), ("( ", "("), (" )", ")"), (" 's", "'s"), (" %", "%")):
        text = text.replace(a, b)
    return text


BUILTIN_DATASETS = {f"aclsum/{a}": a for a in ACLSUM_ASPECTS}


# -- splits ---------------------------------------------------------------------------------------
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


def _split_by_ratio(rows: list[dict[str, Any]], ratio: float, seed: int) -> tuple[list, list]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n = int(round(len(rows) * ratio))
    held = sorted(order[:n])
    keep = sorted(order[n:])
    return [rows[i] for i in keep], [rows[i] for i in held]


def detect_shape(rows: Sequence[Mapping[str, Any]], prompt: str, response: str) -> str:
    first = rows[0]
    if "messages" in first and response not in first:
        return "messages"
    if "text" in first and response not in first and prompt not in first and not template_fields(prompt):
        return "text"
    return "prompt_response"


def check_columns(rows: Sequence[Mapping[str, Any]], needed: Sequence[str], source: str) -> None:
    for i, row in enumerate(rows):
        for column in needed:
            if column not in row:
                raise DataError(f"{source}: row {i + 1} has no column {column!r} (columns: {', '.join(map(str, row))})")
            if row[column] is None or (isinstance(row[column], str) and not row[column].strip()):
                raise DataError(f"{source}: row {i + 1}, column {column!r} is empty")


def load_task(data: Any, seed: int) -> TaskData:
    """Build the task's splits from a `DataConfig` (built-in dataset or files)."""
    if data.dataset is not None:
        if data.dataset not in BUILTIN_DATASETS:
            raise DataError(f"data.dataset {data.dataset!r} is not built in; choose one of {', '.join(BUILTIN_DATASETS)}")
        aspect = BUILTIN_DATASETS[data.dataset]
        fmt = PromptFormat.resolve(data.template or f"summarize_{aspect}", "abstract", data.chat_template, data.system_prompt)
        task = TaskData(
            aclsum_rows("train", aspect), aclsum_rows("validation", aspect), aclsum_rows("test", aspect),
            fmt, "prompt_response", "summary", data.dataset,
        )
    else:
        train = read_rows(data.train)
        shape = detect_shape(train, data.prompt, data.response)
        validation = read_rows(data.validation) if data.validation else []
        test = read_rows(data.test) if data.test else []
        if not test and data.test_ratio > 0:
            train, test = _split_by_ratio(train, data.test_ratio, seed)
        if not validation and data.val_ratio > 0:
            train, validation = _split_by_ratio(train, data.val_ratio / max(1e-9, 1 - data.test_ratio), seed + 1)
        fmt = PromptFormat.resolve(data.template, data.prompt, data.chat_template, data.system_prompt)
        needed = {"prompt_response": [*template_fields(fmt.templates[0]), data.response], "text": ["text"], "messages": ["messages"]}[shape]
        for split, rows in (("train", train), ("validation", validation), ("test", test)):
            check_columns(rows, needed, f"{getattr(data, split) or data.train} ({split})")
        task = TaskData(train, validation, test, fmt, shape, data.response, Path(data.train).stem)
    if not task.train:
        raise DataError("the training split is empty")
    if data.max_train_examples is not None:
        rng = random.Random(seed)
        task.train = rng.sample(task.train, min(data.max_train_examples, len(task.train)))
    task.counts = {"train": len(task.train), "validation": len(task.validation), "test": len(task.test)}
    return task


# -- tokenization ---------------------------------------------------------------------------------
@dataclass
class TokenizeStats:
    examples: int = 0
    truncated_prompts: int = 0
    dropped: int = 0
    """Examples whose response alone did not fit max_length (reported, not trained on)."""


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def prompt_ids(tokenizer: Any, fmt: PromptFormat, prompt: str, seq2seq: bool = False) -> list[int]:
    """Token ids of a formatted prompt: the same call for training, generation, evaluation and serving.

    A chat-templated prompt already holds its special tokens as text; a plain prompt gets the
    tokenizer's own (e.g. BOS).
    """
    chat = bool(fmt.chat and getattr(tokenizer, "chat_template", None))
    return _encode(tokenizer, prompt, seq2seq or not chat)


def _fit_prompt(prompt_ids: list[int], budget: int, tail: int = 32) -> list[int]:
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
    eos = tokenizer.eos_token_id
    target_ids = _encode(tokenizer, response_text(tokenizer, fmt, prompt, str(row[response_column])), False) + [eos]
    ids = prompt_ids(tokenizer, fmt, prompt, seq2seq)
    if seq2seq:
        return {"input_ids": _fit_prompt(ids, max_length), "labels": target_ids[:max_length]}, len(ids) > max_length
    if len(target_ids) > max_length - 8:
        return None, False
    fitted = _fit_prompt(ids, max_length - len(target_ids))
    labels = (fitted if train_on_prompt else [IGNORE_INDEX] * len(fitted)) + target_ids
    return {"input_ids": fitted + target_ids, "labels": labels}, len(fitted) < len(ids)


def encode_text(tokenizer: Any, text: str, max_length: int) -> dict[str, list[int]]:
    ids = (_encode(tokenizer, text, True) + [tokenizer.eos_token_id])[:max_length]
    return {"input_ids": ids, "labels": list(ids)}


def encode_messages(tokenizer: Any, messages: list[Mapping[str, str]], max_length: int, train_on_prompt: bool = False) -> dict[str, list[int]]:
    text, spans = format_chat_text(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [
        tok if train_on_prompt or any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
        for tok, (start, _) in zip(ids, offsets)
    ]
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def tokenize_task_rows(
    rows: Sequence[Mapping[str, Any]], tokenizer: Any, task: TaskData, max_length: int,
    seed: int = 0, train_on_prompt: bool = False, seq2seq: bool = False, sample_phrasings: bool = True,
) -> tuple[list[dict[str, list[int]]], TokenizeStats]:
    """Tokenize rows with loss masks; phrasings are sampled per example with `seed` (else canonical)."""
    rng = random.Random(seed)
    stats = TokenizeStats()
    out = []
    for row in rows:
        if task.shape == "text":
            example = encode_text(tokenizer, str(row["text"]), max_length)
        elif task.shape == "messages":
            example = encode_messages(tokenizer, row["messages"], max_length, train_on_prompt)
        else:
            phrasing = rng.randrange(len(task.format.templates)) if sample_phrasings else 0
            example, truncated = encode_prompt_response(
                tokenizer, task.format, row, task.response, max_length, phrasing, train_on_prompt, seq2seq
            )
            stats.truncated_prompts += truncated
            if example is None:
                stats.dropped += 1
                continue
        if all(label == IGNORE_INDEX for label in example["labels"]):
            stats.dropped += 1
            continue
        out.append(example)
    stats.examples = len(out)
    if stats.dropped:
        log.warning("%d example(s) had no target tokens within max_length=%d and were skipped", stats.dropped, max_length)
    if stats.truncated_prompts:
        log.warning("%d prompt(s) were longer than max_length=%d and were cut in the middle", stats.truncated_prompts, max_length)
    return out, stats


# -- batching -------------------------------------------------------------------------------------
def collate(examples: Sequence[Mapping[str, list[int]]], pad_id: int, seq2seq: bool = False) -> dict[str, torch.Tensor]:
    """Right-pad a batch. The attention mask and the -100 labels come from lengths, never from pad ids."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    label_width = max(len(e["labels"]) for e in examples) if seq2seq else width
    labels = torch.full((len(examples), label_width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"])
        attention[i, :n] = 1
        labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def length_grouped_order(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, then sort within windows of 50 batches by length, so batches hold similar lengths.

    Batches are shuffled again so long and short ones are interleaved (the group_by_length recipe).
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    grouped = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        grouped.extend(chunk)
    batches = [grouped[i : i + batch_size] for i in range(0, len(grouped), batch_size)]
    rng.shuffle(batches)
    return batches


def iter_batches(examples: Sequence[Mapping[str, list[int]]], batch_size: int) -> Iterator[list[Mapping[str, list[int]]]]:
    for i in range(0, len(examples), batch_size):
        yield examples[i : i + batch_size]
