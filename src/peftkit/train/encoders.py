"""The encoder objectives (`task: embedding | classification`): LoRA on an encoder, a batch of rows
scored whole, validation scores each epoch, and base vs adapter on the test split at the end.

A unit is one row ((query, passage) pair, or (text, label)); a step's rows form ONE micro-batch,
because the contrastive loss uses every other passage of the batch as a negative (config refuses
`train.micro_batch_size` for these tasks). The loss is a sum over rows with the row count beside
it, like the token loss's sum over target tokens.

Example:
    >>> objective = EmbeddingObjective(load_config(None, ["task=embedding"]))
    >>> prepared = objective.prepare(torch.float32, torch.device("cpu"))
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import AdaptedModel
from ..config import RunConfig
from ..errors import ConfigError
from ..io import atomic_write_json
from ..models import builtin_origin, load_encoder
from ..tasks.classification import head_module_names, logits
from ..tasks.data import EncoderData, load_encoder_data
from ..tasks.embedding import contrastive_loss, distinct_passages, embed, tokenize
from ..tasks.evaluate import before_after, score_split
from .distributed import Distributed
from .objectives import MicroBatch, Prepared, Validation
from .setup import ADAPTER_NAME, prepare_model

log = logging.getLogger(__name__)


def lora_config(cfg: RunConfig, model: nn.Module) -> Any:
    """`cfg.lora`, with the classification head added to `modules_to_save` (a fresh head must train)."""
    if cfg.task != "classification":
        return cfg.lora
    heads = [h for h in head_module_names(model) if h not in cfg.lora.modules_to_save]
    return dataclasses.replace(cfg.lora, modules_to_save=[*cfg.lora.modules_to_save, *heads])


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """A seeded shuffle per epoch: a pure function of (seed, epoch), so a resume replays it."""
    order = list(range(count))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return order


def adapter_metadata(cfg: RunConfig, data: EncoderData) -> dict[str, Any]:
    """What `peftkit.json` records: the run, the task, the class names in head order, the base's origin."""
    return {"run_config": cfg.to_dict(), "task": cfg.task, "dataset": data.name, "labels": data.labels,
            "base_model": builtin_origin(cfg.model)}


def padded_size(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(real tokens, positions including padding) of a tokenized batch."""
    mask = batch["attention_mask"]
    return int(mask.sum()), mask.numel()


class EncoderObjective:
    """What embedding and classification share: rows, the encoder + LoRA, epochs, scores, the adapter."""

    count_unit = "examples"
    name = "encoder"

    def __init__(self, cfg: RunConfig) -> None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(f"task {cfg.task} trains in one process; run it without torchrun")
        self.cfg = cfg
        self.data = load_encoder_data(cfg)
        log.info("%s on %s: train %d, validation %d, test %d rows", cfg.task, self.data.name, len(self.data.train),
                 len(self.data.validation), len(self.data.test))
        self.tokenizer: Any = None

    @property
    def units(self) -> list[dict[str, Any]]:
        return self.data.train

    def prepare(self, dtype: torch.dtype, device: torch.device) -> Prepared:
        """The encoder (with a fresh, seeded head for classification) and the LoRA adapter, fresh or continued."""
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)  # the fresh head: the same in training and in `peftkit eval`'s base column
        classes = len(self.data.labels) if cfg.task == "classification" else None
        model, self.tokenizer = load_encoder(cfg.model, classes, dtype, device)
        adapted = prepare_model(dataclasses.replace(cfg, lora=lora_config(cfg, model)), model)
        adapted.to(device)
        return Prepared(model, self.tokenizer, adapted)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        order, size = epoch_order(len(self.units), self.cfg.train.seed, epoch), self.cfg.train.batch_size
        return [order[i : i + size] for i in range(0, len(order), size)]

    def describe(self, unit: dict[str, Any]) -> str:
        text = unit.get("query", unit.get("text", ""))
        return f"{text[:60]!r}"

    def validate(self, forward: nn.Module, adapted: AdaptedModel, step: int) -> Validation | None:
        if not self.data.validation:
            return None
        device = next(adapted.parameters()).device
        scores = score_split(self.cfg, adapted, self.tokenizer, self.data.validation, self.data.labels, device)
        adapted.train()
        log.info("step %d: validation %s", step, scores)
        return Validation({f"val_{k}": v for k, v in scores.items()}, None)

    def save(self, adapted: AdaptedModel, out: Path, info: Distributed) -> Path:
        return adapted.save_adapter(out / "adapter", ADAPTER_NAME, metadata=adapter_metadata(self.cfg, self.data))

    def report(self, adapted: AdaptedModel, out: Path, info: Distributed) -> dict[str, Any]:
        """Base (adapter disabled) vs adapter on the test split (validation if no test), into summary.json."""
        split = "test" if self.data.test else "validation"
        rows, device = self.data.split(split), next(adapted.parameters()).device
        test = before_after(self.cfg, adapted, self.tokenizer, rows, self.data.labels, device) if rows else {}
        atomic_write_json(out / "summary.json", {"adapter": str(out / "adapter"), "task": self.cfg.task,
                                                 "trainable": adapted.trainable_report(), "split": split, **test})
        record = {"split": split, **{f"{who}_{k}": v for who, scores in test.items() for k, v in scores.items()}}
        return {"test": test, "split": split, "record": record}


class EmbeddingObjective(EncoderObjective):
    """In-batch-negatives contrastive loss over (query, passage) pairs (see tasks/embedding.py)."""

    name = "embedding"

    def micro_batches(self, units: Sequence[dict[str, Any]], size: int | None, device: torch.device) -> list[MicroBatch]:
        passages, targets = distinct_passages(units)
        queries = tokenize(self.tokenizer, [r["query"] for r in units], self.cfg.data.max_length, device)
        corpus = tokenize(self.tokenizer, passages, self.cfg.data.max_length, device)
        (q_tokens, q_positions), (p_tokens, p_positions) = padded_size(queries), padded_size(corpus)
        inputs = {"queries": queries, "passages": corpus, "targets": targets.to(device)}
        return [MicroBatch(inputs, len(units), q_tokens + p_tokens, q_positions + p_positions)]

    def loss(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pooling = self.cfg.embedding.pooling
        queries, passages = embed(model, inputs["queries"], pooling), embed(model, inputs["passages"], pooling)
        mean = contrastive_loss(queries, passages, inputs["targets"], self.cfg.embedding.scale)
        return mean * len(inputs["targets"]), {}


class ClassificationObjective(EncoderObjective):
    """Cross-entropy of the (fully trained) head over the classes (see tasks/classification.py)."""

    name = "classification"

    def micro_batches(self, units: Sequence[dict[str, Any]], size: int | None, device: torch.device) -> list[MicroBatch]:
        batch = tokenize(self.tokenizer, [r["text"] for r in units], self.cfg.data.max_length, device)
        targets = torch.tensor([self.data.labels.index(r["label"]) for r in units], device=device)
        return [MicroBatch({"batch": batch, "targets": targets}, len(units), *padded_size(batch))]

    def loss(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return F.cross_entropy(logits(model, inputs["batch"]), inputs["targets"], reduction="sum"), {}
