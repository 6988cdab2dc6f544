"""Before / after scores of an encoder adapter: the base (adapter disabled) against the adapter, on one split.

`peftkit eval --adapter runs/embed/adapter` lands here when the adapter's peftkit.json says its
run's task is `embedding` or `classification`; training calls `before_after` on the test split.

Example:
    >>> results = evaluate_encoder_adapters(["runs/embed/adapter"], split="test")
    >>> results["systems"]["base"]["mrr"], results["systems"]["embed"]["mrr"]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import AdaptedModel, read_sidecar
from ..artifacts import ENCODER_TASKS, load_artifact
from ..config import RunConfig, config_from_dict
from ..errors import AdapterError, PeftkitError
from ..eval.systems import split_named, system_name
from ..io import atomic_write_json
from ..models import resolve_device
from .classification import evaluate_classification
from .data import load_encoder_data
from .embedding import evaluate_retrieval

COUNTS = ("queries", "passages", "examples")
"""Keys of a score dict that count what was scored rather than score it."""


def score_split(
    cfg: RunConfig, model: nn.Module, tokenizer: Any, rows: Sequence[dict[str, Any]], labels: list[str],
    device: torch.device | str = "cpu", batch_size: int = 32,
) -> dict[str, float]:
    """The task's metrics of `model` on `rows` (retrieval for embeddings, accuracy / F1 for classification)."""
    model.eval()
    if cfg.task == "embedding":
        return evaluate_retrieval(model, tokenizer, rows, cfg.embedding.pooling, cfg.data.max_length,
                                  cfg.embedding.recall_at, batch_size, device)
    return evaluate_classification(model, tokenizer, rows, labels, cfg.data.max_length, batch_size, device)


def before_after(
    cfg: RunConfig, adapted: AdaptedModel, tokenizer: Any, rows: Sequence[dict[str, Any]], labels: list[str],
    device: torch.device | str = "cpu",
) -> dict[str, dict[str, float]]:
    """{"base": scores with the adapter disabled, "adapter": scores with it on}."""
    with adapted.disable_adapter():
        base = score_split(cfg, adapted, tokenizer, rows, labels, device)
    return {"base": base, "adapter": score_split(cfg, adapted, tokenizer, rows, labels, device)}


def encoder_task(spec: str | Path) -> str | None:
    """`embedding` / `classification` for an adapter (PATH or NAME=PATH) trained on that task, else None."""
    task = read_sidecar(split_named(spec)[1]).get("task")
    return task if task in ENCODER_TASKS else None


def run_config_of(path: str | Path) -> RunConfig:
    """The RunConfig an adapter was trained with (from its peftkit.json)."""
    raw = read_sidecar(path).get("run_config")
    if not isinstance(raw, dict):
        raise AdapterError(f"{path}: peftkit.json records no run_config; it was not written by `peftkit train`")
    return config_from_dict(raw, source=f"{path}/peftkit.json")


def load_encoder_adapter(path: str | Path, model: str | None = None, device: torch.device | str = "cpu") -> tuple[AdaptedModel, Any]:
    """The adapter on its base encoder (or `model`), in fp32; the base head is seeded as in training."""
    cfg = run_config_of(path)
    artifact = load_artifact(path, model or cfg.model, device=str(device), precision="fp32")
    assert artifact.adapted is not None  # run_config_of read an adapter's peftkit.json
    return artifact.adapted, artifact.tokenizer


def evaluate_encoder_adapters(
    adapters: Sequence[str | Path], split: str = "test", limit: int | None = None, model: str | None = None,
    out: str | Path | None = None, device: str = "auto",
) -> dict[str, Any]:
    """Score the base and each adapter (all of the same task and data) on `split`; write results.json to `out`."""
    if not adapters:
        raise PeftkitError("pass --adapter PATH of an embedding or classification adapter")
    tasks = {encoder_task(a) for a in adapters}
    if len(tasks) != 1:
        raise PeftkitError(f"--adapter: compare adapters of one task at a time (got tasks {sorted(map(str, tasks))})")
    dev = resolve_device(device)
    named = [split_named(a) for a in adapters]
    cfg = run_config_of(named[0][1])
    data = load_encoder_data(cfg)
    rows = data.split(split)[:limit]
    if not rows:
        raise PeftkitError(f"the {split} split of {data.name} is empty; choose --split test or validation")
    systems: dict[str, dict[str, float]] = {}
    taken: set[str] = {"base"}
    for given, path in named:
        adapted, tokenizer = load_encoder_adapter(path, model, dev)
        scores = before_after(cfg, adapted, tokenizer, rows, data.labels, dev)
        systems.setdefault("base", scores["base"])
        name = given or system_name(Path(path), taken)
        taken.add(name)
        systems[name] = scores["adapter"]
    results = {"task": cfg.task, "dataset": data.name, "split": split, "labels": data.labels, "systems": systems}
    if out is not None:
        atomic_write_json(Path(out) / "results.json", results)
    return results


def results_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per metric, one column per system, and the last adapter's change vs base."""
    names = list(results["systems"])
    header = ["metric", *names, "change"]
    rows = []
    for metric in [k for k in results["systems"][names[0]] if k not in COUNTS]:
        values = [results["systems"][n][metric] for n in names]
        rows.append([metric, *[f"{v:.4f}" for v in values], f"{values[-1] - values[0]:+.4f}"])
    return header, rows
