"""The training side of the data: tokenized tasks, the mixture pool, packing, and each epoch's order.

Example:
    >>> data = build_train_data(cfg, load_tasks(cfg.data, 0), tokenizer, seq2seq=False)
    >>> batches = epoch_batches(data.lengths, cfg.train.batch_size, seed=0, epoch=0)
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

from ..config import RunConfig
from ..data.batching import length_grouped_order, pack_examples, packed_example
from ..data.datasets import TaskData, mix_examples, tokenize_task_rows
from ..errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class TrainData:
    tasks: list[TaskData]
    units: list[dict[str, Any]]
    """What the loop batches: tokenized examples, or packed sequences of them."""
    validation: list[dict[str, Any]]
    truncation: dict[str, int] = field(default_factory=dict)

    @property
    def lengths(self) -> list[int]:
        return [len(u["input_ids"]) for u in self.units]


def build_train_data(cfg: RunConfig, tasks: list[TaskData], tokenizer: Any, seq2seq: bool) -> TrainData:
    """Tokenize every task (train: phrasings sampled; validation: canonical), mix by weight, pack."""
    if cfg.data.packing and seq2seq:
        raise ConfigError("data.packing works with decoder-only models; this model is encoder-decoder")
    d, seed = cfg.data, cfg.train.seed
    per_task, validation = [], []
    truncation = {"dropped": 0, "truncated_prompts": 0, "truncated_responses": 0}
    for task in tasks:
        train, stats = tokenize_task_rows(task.train, tokenizer, task, d.max_length, seed, d.train_on_prompt, seq2seq)
        val, _ = tokenize_task_rows(task.validation, tokenizer, task, d.max_length, seed, d.train_on_prompt, seq2seq,
                                    sample_phrasings=False, split="validation")
        per_task.append(train)
        validation += val
        for key in truncation:
            truncation[key] += getattr(stats, key)
    examples = mix_examples(per_task, [t.weight for t in tasks], seed)
    if not examples:
        raise DataError("no training example has target tokens within data.max_length; raise data.max_length")
    log_counts(tasks, examples)
    units = examples
    if d.packing:
        packs = pack_examples([len(e["input_ids"]) for e in examples], d.max_length, seed)
        units = [packed_example([examples[i] for i in pack]) for pack in packs]
        log.info("packing: %d examples in %d sequences of up to %d tokens", len(examples), len(units), d.max_length)
    return TrainData(tasks, units, validation, truncation)


def log_counts(tasks: list[TaskData], examples: list[dict[str, Any]]) -> None:
    """Rows per split and task, and training examples per epoch after weighting."""
    per_epoch = {t.name: 0 for t in tasks}
    for e in examples:
        per_epoch[e["task"]] += 1
    for t in tasks:
        log.info("data %s: train %d, validation %d, test %d rows; %d training examples per epoch (weight %g)",
                 t.name, t.counts["train"], t.counts["validation"], t.counts["test"], per_epoch[t.name], t.weight)


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The data order of one epoch: a pure function of (seed, epoch), so a resume can replay it."""
    return length_grouped_order(lengths, batch_size, random.Random(seed * 1000 + epoch))
