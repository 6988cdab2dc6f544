"""Sequence classification: LoRA on the encoder plus its head trained fully (`modules_to_save`),
the logits, and accuracy / macro-F1 (the training loss is in train/encoders.py).

The head (`classifier` in BERT-like models, `score` in decoder ones) is new for every run, so it
is always trained and saved with the adapter; PEFT loads the folder as a SEQ_CLS adapter.

Example:
    >>> classification_metrics(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), num_classes=2)
    {'accuracy': 0.6667, 'macro_f1': 0.6667}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .embedding import tokenize

HEAD_NAMES = ("classifier", "score")


def head_module_names(model: nn.Module) -> list[str]:
    """The classification head of a `...ForSequenceClassification` model (a direct child)."""
    found = [name for name, _ in model.named_children() if name in HEAD_NAMES]
    if not found:
        children = ", ".join(name for name, _ in model.named_children())
        raise ConfigError(f"{type(model).__name__} has no classification head named {' or '.join(HEAD_NAMES)} "
                          f"(its modules: {children}); name it in lora.modules_to_save")
    return found


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, classes) logits of a tokenized batch, in the graph (for training)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def classification_metrics(predicted: torch.Tensor, gold: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 (the unweighted mean of each class's F1; a class never predicted nor present scores 0)."""
    f1s = []
    for c in range(num_classes):
        tp = int(((predicted == c) & (gold == c)).sum())
        fp = int(((predicted == c) & (gold != c)).sum())
        fn = int(((predicted != c) & (gold == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    accuracy = float((predicted == gold).double().mean())
    return {"accuracy": round(accuracy, 4), "macro_f1": round(sum(f1s) / num_classes, 4)}


@torch.no_grad()
def evaluate_classification(
    model: nn.Module, tokenizer: Any, rows: Sequence[dict[str, Any]], labels: list[str], max_length: int,
    batch_size: int = 32, device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Accuracy and macro-F1 of the model's argmax class on `rows`, and their count."""
    device = torch.device(device)
    texts = [r["text"] for r in rows]
    predicted = torch.cat([logits(model, tokenize(tokenizer, texts[i : i + batch_size], max_length, device)).argmax(-1).cpu()
                           for i in range(0, len(texts), batch_size)])
    gold = torch.tensor([labels.index(r["label"]) for r in rows])
    return {**classification_metrics(predicted, gold, len(labels)), "examples": len(rows)}
