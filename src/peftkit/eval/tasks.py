"""Generation tasks to score: the task a system was trained on, and held-out tasks for forgetting.

A held-out task is one the run never trained on: another aclsum aspect (same abstracts, a
different question: transfer, not independence) or general questions and answers from
`chatterbot-corpus` (BSD; `pip install chatterbot-corpus`).

Example:
    >>> task = builtin_task("aclsum/challenge", limit=50)
    >>> task.rows[0]["summary"]
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..config import DataConfig, config_from_dict
from ..data.datasets import load_task
from ..data.sources import BUILTIN_DATASETS
from ..data.templates import PromptFormat
from ..errors import DataError, PeftkitError

CHATTERBOT = "chatterbot"
HELD_OUT_CHOICES = (*BUILTIN_DATASETS, CHATTERBOT)


@dataclass
class EvalTask:
    """Rows to prompt with, the column holding each reference, and the task's canonical prompt format."""

    name: str
    rows: list[dict[str, Any]]
    response: str
    format: PromptFormat
    split: str = "test"
    primary: bool = False
    """The task the comparison is about (score table, change vs base); the others are held out (forgetting)."""

    def references(self) -> list[str]:
        return [str(row[self.response]) for row in self.rows]


def canonical(fmt: PromptFormat) -> PromptFormat:
    """The first phrasing only: what evaluation prompts with."""
    return PromptFormat(fmt.templates[:1], fmt.chat, fmt.system_prompt)


def split_rows(task: Any, split: str) -> list[dict[str, Any]]:
    if split not in ("test", "validation"):
        raise PeftkitError(f"split {split!r}: choose test or validation")
    rows = task.test if split == "test" else task.validation
    if not rows:
        raise DataError(f"task {task.name!r} has no {split} rows")
    if task.shape != "prompt_response":
        raise DataError(f"task {task.name!r} is {task.shape} data; generation scoring needs prompt/response rows")
    return rows


def task_from_run(meta: Mapping[str, Any], split: str = "test", limit: int | None = None) -> EvalTask:
    """The task a run trained on, rebuilt from the run config in its peftkit.json (same split, same seed)."""
    if "run_config" not in meta:
        raise PeftkitError("the folder records no run config (peftkit.json); pass --dataset NAME")
    cfg = config_from_dict(meta["run_config"], source="peftkit.json run_config")
    task = load_task(cfg.data, cfg.train.seed)
    rows = split_rows(task, split)[:limit]
    return EvalTask(task.name, rows, task.response, canonical(task.format), split, primary=True)


def builtin_task(name: str, split: str = "test", limit: int | None = None, primary: bool = False) -> EvalTask:
    """A built-in dataset (`aclsum/challenge`) or `chatterbot` general Q/A, first `limit` rows."""
    if name == CHATTERBOT:
        return chatterbot_task(limit)
    if name not in BUILTIN_DATASETS:
        raise PeftkitError(f"task {name!r} is not built in; choose one of {', '.join(HELD_OUT_CHOICES)}")
    task = load_task(DataConfig(dataset=name), seed=0)
    rows = split_rows(task, split)[:limit]
    return EvalTask(name, rows, task.response, canonical(task.format), split, primary)


def trained_task_name(meta: Mapping[str, Any]) -> str | None:
    """The (first) task a run trained on, named as `load_task` names it, from its peftkit.json."""
    data = (meta.get("run_config") or {}).get("data") or {}
    first = data["mixture"][0] if data.get("mixture") else data
    if first.get("name"):
        return first["name"]
    return Path(first["train"]).stem if first.get("train") else first.get("dataset")


def chatterbot_dir() -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the chatterbot task needs the corpus: pip install chatterbot-corpus")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "english"


@lru_cache(maxsize=1)
def chatterbot_pairs() -> tuple[dict[str, str], ...]:
    """Every (question, first one-line answer) pair of the English corpus, one per distinct question."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    pairs: dict[str, str] = {}
    for file in sorted(chatterbot_dir().glob("*.yml")):
        for conversation in yaml.load(file.read_text(encoding="utf-8"), Loader=loader).get("conversations", []):
            if len(conversation) >= 2 and all(isinstance(turn, str) for turn in conversation[:2]):
                question, answer = conversation[0].strip(), conversation[1].strip()
                if "\n" not in answer:  # one-line answers: outputs are scored on their first line
                    pairs.setdefault(question, answer)
    return tuple({"question": q, "answer": a} for q, a in pairs.items())


def chatterbot_task(limit: int | None = None, seed: int = 0) -> EvalTask:
    """General questions (a seeded sample across all categories) with the corpus' answers as references."""
    rows = [dict(row) for row in chatterbot_pairs()]
    random.Random(seed).shuffle(rows)
    return EvalTask(CHATTERBOT, rows[:limit], "answer", PromptFormat(["{question}"], chat=True), "all")


def plan_tasks(
    system_metas: list[Mapping[str, Any]], dataset: str | None, split: str, limit: int | None, held_out: list[str],
    held_out_limit: int | None = None,
) -> list[EvalTask]:
    """The primary task (`dataset`, else the first run's own task and split) followed by the held-out tasks.

    Held-out tasks take their first `held_out_limit` rows (default: `limit`).
    """
    tasks = []
    if dataset is not None:
        tasks.append(builtin_task(dataset, split, limit, primary=True))
    else:
        meta = next((m for m in system_metas if "run_config" in m), None)
        if meta is not None:
            tasks.append(task_from_run(meta, split, limit))
    for name in held_out:
        if any(t.name == name for t in tasks):
            raise PeftkitError(f"--held-out {name}: that is the task being scored; a held-out task must differ")
        tasks.append(builtin_task(name, "test", held_out_limit or limit))
    return tasks

