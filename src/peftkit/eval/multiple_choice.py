"""Multiple-choice accuracy by the log-likelihood of each option (the MMLU / lm-eval-harness way).

The question is the prompt; each option's text is scored as the continuation; the option
with the highest summed log-probability is the model's answer (`accuracy`), or the highest
per-byte log-probability, which does not favour short options (`accuracy_norm`).

A file holds one question per row (MMLU's layout): `question`, `choices` (a list) or
columns `A`, `B`, `C`, `D`, and `answer` as an index (0-based) or a letter.

Example:
    >>> questions = read_mc_file("tests/data/mc_general.jsonl")
    >>> mc_accuracy(model, tokenizer, questions)["accuracy"]["value"]
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..data.datasets import prompt_ids
from ..data.sources import read_rows
from ..data.templates import PromptFormat, format_prompt, response_text
from ..errors import DataError
from ..models import is_seq2seq
from .metrics import bootstrap_ci

MC_FORMAT = PromptFormat(["Question: {question}\nAnswer:"], chat=True)
LETTERS = string.ascii_uppercase


@dataclass
class McQuestion:
    question: str
    choices: list[str]
    answer: int


def _choices(row: Mapping[str, Any], where: str) -> list[str]:
    if isinstance(row.get("choices"), list):
        choices = [str(c) for c in row["choices"]]
    else:
        choices = [str(row[letter]) for letter in LETTERS if letter in row]
    if len(choices) < 2:
        raise DataError(f"{where}: needs a `choices` list or columns A, B, C... with at least two options")
    return choices


def _answer_index(raw: Any, count: int, where: str) -> int:
    text = str(raw).strip()
    if text.isdigit():
        index = int(text)
    elif len(text) == 1 and text.upper() in LETTERS:
        index = LETTERS.index(text.upper())
    else:
        raise DataError(f"{where}: answer {raw!r} must be a 0-based index or a letter A-{LETTERS[count - 1]}")
    if not 0 <= index < count:
        raise DataError(f"{where}: answer {raw!r} is outside the {count} choices")
    return index


def read_mc_file(path: str | Path) -> list[McQuestion]:
    """Questions from a .jsonl / .json / .csv / .parquet file in MMLU's layout."""
    questions = []
    for i, row in enumerate(read_rows(path), 1):
        where = f"{path}: row {i}"
        if "question" not in row or "answer" not in row:
            raise DataError(f"{where}: needs columns question, choices (or A, B, C, D) and answer")
        choices = _choices(row, where)
        questions.append(McQuestion(str(row["question"]), choices, _answer_index(row["answer"], len(choices), where)))
    return questions


@torch.no_grad()
def option_logprobs(model: nn.Module, context: list[int], options: list[list[int]]) -> list[float]:
    """Summed log-probability of each option's tokens following `context` (one batch per question)."""
    device = next(model.parameters()).device
    if is_seq2seq(model):
        width = max(len(o) for o in options)
        labels = torch.full((len(options), width), -100, dtype=torch.long)
        for i, o in enumerate(options):
            labels[i, : len(o)] = torch.tensor(o)
        inputs = torch.tensor([context] * len(options), device=device)
        logits = model(input_ids=inputs, labels=labels.to(device)).logits.float()  # (B, width, V)
        targets = labels.to(device)
    else:
        width = len(context) + max(len(o) for o in options)
        ids = torch.zeros((len(options), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        targets = torch.full((len(options), max(len(o) for o in options)), -100, dtype=torch.long)
        for i, o in enumerate(options):
            ids[i, : len(context) + len(o)] = torch.tensor(context + o)
            mask[i, : len(context) + len(o)] = 1
            targets[i, : len(o)] = torch.tensor(o)
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logits = out[:, len(context) - 1 : width - 1].float()  # the positions that predict option tokens
        targets = targets.to(device)
    logprobs = torch.log_softmax(logits, dim=-1)
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, width)
    return (picked * (targets != -100)).sum(dim=1).tolist()


def encode_question(tokenizer: Any, question: McQuestion, seq2seq: bool) -> tuple[list[int], list[list[int]]]:
    """(context ids, ids of each option) with the same formatting as generation."""
    prompt = format_prompt(tokenizer, MC_FORMAT, {"question": question.question})
    context = prompt_ids(tokenizer, MC_FORMAT, prompt, seq2seq)
    options = [
        tokenizer(response_text(tokenizer, MC_FORMAT, prompt, choice), add_special_tokens=False)["input_ids"]
        for choice in question.choices
    ]
    if any(not o for o in options):
        raise DataError(f"question {question.question[:60]!r} has an empty choice")
    return context, options


def mc_accuracy(model: nn.Module, tokenizer: Any, questions: list[McQuestion], seed: int = 0) -> dict[str, Any]:
    """Accuracy (summed log-likelihood) and length-normalised accuracy (per byte), with 95% intervals."""
    was_training = model.training
    model.eval()
    plain, normed = [], []
    for question in questions:
        context, options = encode_question(tokenizer, question, is_seq2seq(model))
        scores = option_logprobs(model, context, options)
        per_byte = [s / max(1, len(c.encode("utf-8"))) for s, c in zip(scores, question.choices)]
        plain.append(float(max(range(len(scores)), key=scores.__getitem__) == question.answer))
        normed.append(float(max(range(len(per_byte)), key=per_byte.__getitem__) == question.answer))
    model.train(was_training)
    result: dict[str, Any] = {"n": len(questions)}
    for name, values in (("accuracy", plain), ("accuracy_norm", normed)):
        low, high = bootstrap_ci(values, seed=seed)
        result[name] = {"value": sum(values) / len(values), "ci_low": low, "ci_high": high}
    return result
