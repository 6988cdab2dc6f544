"""Recorded systems: outputs saved by an earlier evaluation, scored again beside live ones.

A system that is too slow to train for every comparison (a full fine-tune on a laptop CPU) can be
shown from the `results.json` of the evaluation that generated its outputs: the outputs of the
same rows are read back and scored with this evaluation's metric settings. The rows must be the
ones this evaluation prompts with (references are compared), and the decoding must match, so
the recorded row measures the same thing as the live ones; it is labelled `NAME (recorded)`.

A bare `results.json` (no `NAME=`) stands for every system the file holds, and `recorded_run` tells
which base model, task, split and rows that evaluation scored, so `peftkit eval --recorded FILE`
needs no other argument.

Example:
    >>> system = read_recorded("full=benchmarks/results/full-ft-aclsum-outcome.json")
    >>> system.name
    'full (recorded)'
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PeftkitError
from .systems import System, split_named

DECODING_KEYS = {"max_new_tokens": 60, "num_beams": 1, "do_sample": False, "temperature": 1.0, "top_p": 1.0,
                 "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
"""Generation settings that change the outputs, with the value a file that predates the key used; scoring
settings (first line, stemming) are reapplied."""


def read_results(spec: str, path: Path) -> dict[str, Any]:
    """The results.json an evaluation wrote (`spec`: what the user typed, for the message)."""
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PeftkitError(f"--recorded {spec}: cannot read {path} as a results.json ({err})") from err
    if not isinstance(results, dict) or not isinstance(results.get("tasks"), dict):
        raise PeftkitError(f"--recorded {spec}: {path} is not a results.json written by `peftkit eval` (no tasks)")
    return results


def read_recorded_systems(spec: str) -> list[System]:
    """`NAME=results.json`: that system; a bare `results.json`: every system the file holds."""
    name, path = split_named(spec)
    if name is not None:
        return [read_recorded(spec)]
    names = [s.get("name") for s in read_results(spec, path).get("systems", []) if s.get("name")]
    if not names:
        raise PeftkitError(f"--recorded {spec}: {path} holds no systems")
    return [read_recorded(f"{each}={path}") for each in names]


@dataclass
class RecordedRun:
    """What an earlier evaluation scored, for an evaluation given nothing but its file."""

    model: str | None
    """The base model of its systems."""
    task: str | None
    """Its primary task."""
    split: str
    limit: int
    """How many rows of that task it scored."""


def recorded_run(spec: str) -> RecordedRun:
    """The base model, primary task, split and row count of the evaluation that wrote `spec`'s file."""
    _, path = split_named(spec)
    results = read_results(spec, path)
    task, data = next(((t, d) for t, d in results["tasks"].items() if d.get("primary")), (None, {}))
    model = next((s.get("base_model") for s in results.get("systems", []) if s.get("base_model")), None)
    return RecordedRun(model, task, data.get("split", "test"), int(data.get("n") or len(data.get("references", []))))


def read_recorded(spec: str) -> System:
    """`NAME=results.json` -> the system NAME of that evaluation, with its outputs on every task there."""
    name, path = split_named(spec)
    if name is None:
        raise PeftkitError(f"--recorded {spec}: give NAME=FILE, the system's name in the results.json FILE")
    results = read_results(spec, path)
    summary = next((s for s in results.get("systems", []) if s.get("name") == name), None)
    if summary is None:
        found = ", ".join(s.get("name", "?") for s in results.get("systems", []))
        raise PeftkitError(f"--recorded {spec}: {path} has no system {name!r} (it has: {found or 'none'})")
    tasks = {task: data for task, data in results.get("tasks", {}).items() if name in data.get("outputs", {})}
    return System(
        f"{name} (recorded)", "recorded", path, {"recorded": {"name": name, "tasks": tasks,
                                                              "settings": results.get("settings", {}),
                                                              "command": results.get("command")}},
        summary.get("base_model"), summary.get("train_seconds"), trainable_pct=summary.get("trainable_pct"),
    )


def check_decoding(system: System, settings: dict[str, Any]) -> None:
    """A recorded row is comparable only if it was generated the way this evaluation generates."""
    recorded = system.meta["recorded"]["settings"]
    differ = [f"{key} {recorded.get(key, default)!r} (now {settings[key]!r})" for key, default in DECODING_KEYS.items()
              if recorded.get(key, default) != settings[key]]
    if differ:
        raise PeftkitError(f"--recorded {system.path}: its outputs were generated with {', '.join(differ)}; "
                           "evaluate with the same decoding options or leave the recorded system out")


def recorded_outputs(system: System, task_name: str, split: str, references: list[str]) -> list[str] | None:
    """The recorded outputs for these rows of `task_name`; None when the file did not score that task."""
    data = system.meta["recorded"]["tasks"].get(task_name)
    if data is None:
        return None
    outputs, kept = data["outputs"][system.meta["recorded"]["name"]], data.get("references", [])
    if data.get("split") != split or kept[: len(references)] != references:
        raise PeftkitError(f"--recorded {system.path}: its {task_name} outputs are for other rows "
                           f"({data.get('split')} split, {len(kept)} rows) than this evaluation's "
                           f"{len(references)} {split} rows; use --limit {len(kept)} or less, on the same split")
    return outputs[: len(references)]
