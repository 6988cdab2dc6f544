"""Rows of the encoder tasks: (query, passage) pairs for embeddings, (text, label) rows for classification.

Built in (from aclsum's own train / validation / test papers):
- `aclsum/aspects`: every summary sentence (challenge, approach, outcome) of a paper; for embeddings the
  query is the sentence and the passage its paper's abstract, for classification the label is the aspect.
- `aclsum/outcome` (challenge, approach): the same pairs for one aspect only (embeddings).
Files: any format `read_rows` reads, with the columns `embedding.query` / `embedding.passage` or
`classification.text` / `classification.label`; validation and test are held out by ratio when not given.

Example:
    >>> data = load_encoder_data(load_config(None, ["task=embedding", "data.dataset=aclsum/aspects"]))
    >>> data.test[0]  # {"query": "...", "passage": "...abstract...", "passage_id": "E09-1056"}
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..data.datasets import split_by_ratio
from ..data.sources import ACLSUM_ASPECTS, aclsum_rows, check_columns, read_rows
from ..errors import DataError

SPLITS = ("train", "validation", "test")


@dataclass
class EncoderData:
    """The three splits in the task's own shape, and (classification) the class names in head order."""

    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    test: list[dict[str, Any]]
    labels: list[str] = field(default_factory=list)
    name: str = ""

    def split(self, name: str) -> list[dict[str, Any]]:
        if name not in SPLITS:
            raise DataError(f"split {name!r}: choose one of {', '.join(SPLITS)}")
        return getattr(self, name)


def aclsum_split(task: str, dataset: str, split: str) -> list[dict[str, Any]]:
    """One aclsum split as embedding pairs or aspect-labelled sentences (paper order, then aspect order)."""
    aspects = ACLSUM_ASPECTS if dataset == "aclsum/aspects" else (dataset.split("/", 1)[1],)
    per_aspect = {aspect: aclsum_rows(split, aspect) for aspect in aspects}
    rows = []
    for i in range(len(per_aspect[aspects[0]])):
        for aspect in aspects:
            paper = per_aspect[aspect][i]
            if task == "embedding":
                rows.append({"query": paper["summary"], "passage": paper["abstract"], "passage_id": paper["id"]})
            else:
                rows.append({"text": paper["summary"], "label": aspect})
    return rows


def _file_rows(cfg: RunConfig, path: str, split: str) -> list[dict[str, Any]]:
    """A file's rows in the task's shape; a passage's id is its text (identical passages are one document)."""
    rows = read_rows(path, cfg.data.columns)
    if cfg.task == "embedding":
        query, passage = cfg.embedding.query, cfg.embedding.passage
        check_columns(rows, [query, passage], f"{path} ({split})")
        return [{"query": str(r[query]), "passage": str(r[passage]), "passage_id": str(r[passage])} for r in rows]
    text, label = cfg.classification.text, cfg.classification.label
    check_columns(rows, [text, label], f"{path} ({split})")
    return [{"text": str(r[text]), "label": str(r[label])} for r in rows]


def _file_splits(cfg: RunConfig) -> list[list[dict[str, Any]]]:
    d, seed = cfg.data, cfg.train.seed
    train = _file_rows(cfg, str(d.train), "train")
    validation = _file_rows(cfg, d.validation, "validation") if d.validation else []
    test = _file_rows(cfg, d.test, "test") if d.test else []
    if not test and d.test_ratio > 0:
        train, test = split_by_ratio(train, d.test_ratio, seed)
    if not validation and d.val_ratio > 0:
        train, validation = split_by_ratio(train, d.val_ratio / max(1e-9, 1 - d.test_ratio), seed + 1)
    return [train, validation, test]


def class_names(cfg: RunConfig, splits: list[list[dict[str, Any]]]) -> list[str]:
    """`classification.labels`, or the sorted labels of the training rows; every split must use only those."""
    labels = list(cfg.classification.labels) or sorted({r["label"] for r in splits[0]})
    if len(labels) < 2:
        raise DataError(f"classification needs at least 2 classes; the training rows have {labels}")
    for name, rows in zip(SPLITS, splits):
        unknown = sorted({r["label"] for r in rows} - set(labels))
        if unknown:
            raise DataError(f"{name} split: labels {unknown} are not among the classes {labels}; "
                            "add them to classification.labels or fix the rows")
    return labels


def load_encoder_data(cfg: RunConfig) -> EncoderData:
    """The run's rows for `task: embedding | classification` (config validation already checked the dataset)."""
    if cfg.data.train is None and cfg.data.dataset is not None:
        splits = [aclsum_split(cfg.task, cfg.data.dataset, split) for split in SPLITS]
        name = cfg.data.dataset
    else:
        splits = _file_splits(cfg)
        name = Path(str(cfg.data.train)).stem
    if not splits[0]:
        raise DataError(f"{name}: the training split is empty")
    if cfg.data.max_train_examples is not None:
        splits[0] = random.Random(cfg.train.seed).sample(splits[0], min(cfg.data.max_train_examples, len(splits[0])))
    labels = class_names(cfg, splits) if cfg.task == "classification" else []
    return EncoderData(*splits, labels=labels, name=name)
