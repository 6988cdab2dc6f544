"""A grid of trainings over methods, LoRA ranks and learning rates, scored on one task, one after another.

Every run shares the base config (same data, same seed); only the swept keys change. The
rank goes to `lora.r` with `lora.alpha` scaled to keep alpha / r as configured, so a curve
over rank is not a curve over the effective learning rate. Methods without a rank (full
fine-tuning) run once per learning rate and show as reference lines. Runs are scored on
the validation split by default: a sweep chooses hyperparameters, and test data must not.

Example:
    >>> cfg = load_config("configs/default.yaml")
    >>> results = run_sweep(cfg, ["lora"], [4, 16, 64], [2e-4], "runs/sweep", limit=50)
    >>> results["sweep"]["points"][0]["score"]
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from safetensors import safe_open

from ..config import RunConfig, config_from_dict
from ..errors import ConfigError
from ..train import run_training
from .evaluate import GenerationSettings, run_evaluation
from .systems import describe_system
from .tasks import task_from_run

log = logging.getLogger(__name__)

RANKED_METHODS = ("lora", "qlora")
"""Methods whose size is set by `lora.r`."""


def run_name(method: str, rank: int | None, lr: float) -> str:
    return f"{method}-r{rank}-lr{lr:g}" if rank is not None else f"{method}-lr{lr:g}"


def grid(cfg: RunConfig, methods: list[str], ranks: list[int], lrs: list[float], out: Path) -> list[RunConfig]:
    """One config per (method, rank, lr); output folders under `out`, named by the swept values."""
    if not methods or not lrs:
        raise ConfigError("a sweep needs at least one --method and one --lr")
    if any(m in RANKED_METHODS for m in methods) and not ranks:
        raise ConfigError("give at least one --rank for LoRA-family methods")
    base = cfg.to_dict()
    configs = []
    for method in methods:
        for lr in lrs:
            for rank in ranks if method in RANKED_METHODS else [None]:
                raw = {**base, "method": method, "train": {**base["train"], "lr": lr},
                       "output_dir": str(out / run_name(method, rank, lr))}
                if rank is not None:
                    ratio = cfg.lora.alpha / cfg.lora.r
                    raw["lora"] = {**base["lora"], "r": rank, "alpha": ratio * rank}
                configs.append(config_from_dict(raw, source=f"sweep {run_name(method, rank, lr)}"))
    return configs


def train_or_reuse(cfg: RunConfig, progress: Any = None) -> Path:
    """Train `cfg`, or reuse its finished adapter when an earlier sweep already wrote it."""
    adapter = Path(cfg.output_dir) / "adapter"
    if adapter.is_dir():
        log.info("reusing finished run %s", adapter)
        return adapter
    return run_training(cfg, progress=progress).adapter_dir


def trainable_params(folder: Path) -> int:
    """Parameters a run trained: every tensor it saved (the adapter's, or the whole model's for `full`)."""
    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total


def run_sweep(
    cfg: RunConfig, methods: list[str], ranks: list[int], lrs: list[float], out: str | Path,
    split: str = "validation", limit: int | None = None, metric: str = "rougeL",
    settings: GenerationSettings | None = None, progress: Any = None,
) -> dict[str, Any]:
    """Train every grid point, score each on `split`; results.json's dict with a `sweep` section."""
    out = Path(out)
    settings = settings or replace(GenerationSettings(), max_new_tokens=cfg.generate.max_new_tokens)
    points = []
    for run_cfg in grid(cfg, methods, ranks, lrs, out):
        adapter = train_or_reuse(run_cfg, progress)
        system = describe_system(adapter, set())
        task = task_from_run(system.meta, split=split, limit=limit)
        result = run_evaluation([system], [task], settings, samples=0)
        score = result["tasks"][task.name]["scores"][system.name][metric]["value"]
        rank = run_cfg.lora.r if run_cfg.method in RANKED_METHODS else None
        points.append({
            "name": run_name(run_cfg.method, rank, run_cfg.train.lr), "method": run_cfg.method, "rank": rank,
            "lr": run_cfg.train.lr, "trainable_params": trainable_params(adapter),
            "score": score, "train_seconds": system.train_seconds, "adapter": str(adapter),
        })
        log.info("%s: %s %.4f", points[-1]["name"], metric, score)
    return {"sweep": {"metric": metric, "split": split, "limit": limit, "points": points}, "settings": asdict(settings)}
