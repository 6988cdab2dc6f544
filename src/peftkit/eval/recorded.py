"""Recorded systems: outputs saved by an earlier evaluation, scored again beside live ones.

A system that is too slow to train for every comparison (a full fine-tune on a laptop CPU) can be
shown from the `results.json` of the evaluation that generated its outputs: the outputs of the
same rows are read back and scored with this evaluation's metric settings. The rows must be the
ones this evaluation prompts with (references are compared), and the decoding must match, so
the recorded row measures the same thing as the live ones; it is labelled `NAME (recorded)`.

Example:
    >>> system = read_recorded("full=benchmarks/results/full-ft-aclsum-outcome.json")
    >>> system.name
    'full (recorded)'
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import PeftkitError
from .systems import System, split_named

DECODING_KEYS = ("max_new_tokens", "num_beams", "do_sample", "temperature", "top_p")
"""Generation settings that change the outputs; scoring settings (first line, stemming) are reapplied."""


def read_recorded(spec: str) -> System:
    """`NAME=results.json` -> the system NAME of that evaluation, with its outputs on every task there."""
    name, path = split_named(spec)
    if name is None:
        raise PeftkitError(f"--recorded {spec}: give NAME=FILE, the system's name in the results.json FILE")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PeftkitError(f"--recorded {spec}: cannot read {path} as a results.json ({err})") from err
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
    differ = [f"{key} {recorded.get(key)!r} (now {settings[key]!r})" for key in DECODING_KEYS
              if key in recorded and recorded[key] != settings[key]]
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
