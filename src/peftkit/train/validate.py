"""Validation during training: loss and perplexity, optional ROUGE-L of generations, best-model
selection and early stopping.

Example:
    >>> selection = Selection("val_loss")
    >>> selection.update(2.1, step=10)   # True: first score is the best so far
    >>> selection.update(2.3, step=20)   # False
    >>> selection.evals_since_best
    1
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..data.batching import collate
from ..data.datasets import TaskData
from ..eval.metrics import first_line, rouge_scores
from ..generate import generate_texts
from .loss import target_count


@torch.no_grad()
def evaluate_loss(
    forward: nn.Module, examples: Sequence[dict], pad_id: int, batch_size: int, device: torch.device, seq2seq: bool,
) -> float | None:
    """Mean loss per target token over `examples` (None when there are none).

    `forward` is the (possibly DDP / FSDP wrapped) ObjectiveForward of a token objective; every rank evaluates every example,
    so all ranks agree on the score without communication.
    """
    if not examples:
        return None
    was_training = forward.training
    forward.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[start : start + batch_size]], pad_id, seq2seq)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss_sum, _ = forward(batch)
        total += float(loss_sum)
        count += target_count(batch, seq2seq)
    forward.train(was_training)
    return total / max(1, count)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def validation_rouge_l(model: nn.Module, tokenizer: Any, tasks: Sequence[TaskData], max_new_tokens: int, batch_size: int) -> float:
    """ROUGE-L F1 (rouge-score, stemmed) of greedy answers on the validation rows, canonical phrasing."""
    predictions, references = [], []
    for task in tasks:
        if task.shape != "prompt_response" or not task.validation:
            continue
        rows = task.validation
        answers = generate_texts(model, tokenizer, task.format, rows, max_new_tokens=max_new_tokens, batch_size=batch_size)
        predictions += [first_line(a) for a in answers]
        references += [str(r[task.response]) for r in rows]
    if not predictions:
        return float("nan")
    return rouge_scores(predictions, references)["rougeL"]["f1"]


@dataclass
class Selection:
    """The best validation score so far, where it was, and how long since it improved."""

    metric: str = "val_loss"
    best: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "val_loss"

    def update(self, score: float, step: int) -> bool:
        """Record a score; True when it is a new best."""
        better = self.best is None or (score > self.best if self.higher_is_better else score < self.best)
        if better and math.isfinite(score):
            self.best, self.best_step, self.evals_since_best = score, step, 0
            return True
        self.evals_since_best += 1
        return False

    def should_stop(self, patience: int) -> bool:
        return patience > 0 and self.evals_since_best >= patience

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
