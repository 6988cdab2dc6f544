"""Where the UI may read and write: the runs folder and the project, nothing else.

Run names are plain folder names under --runs. Paths in a form (data files, an initial
adapter, a local model folder) must resolve, symlinks followed, inside the project or the
runs folder. Choices offered in the form are files found there.

Example:
    >>> roots = Roots(project=Path("."), runs=Path("runs"))
    >>> roots.run_dir("lora-r8")            # runs/lora-r8, or UiError for "../x"
    >>> path_problems({"data": {"train": "/etc/passwd"}}, roots)
    ['data.train: /etc/passwd is outside the project ...']
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import UiError

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
FILE_KEYS = ("data.train", "data.validation", "data.test", "train.init_adapter")
"""Config keys holding a path that must stay inside the project or the runs folder."""
MODEL_KEYS = ("model", "prompt_tuning.tokenizer", "prefix_tuning.tokenizer")
"""Keys holding a built-in name, a Hub id, or a local folder (which must stay inside too)."""
SKIPPED_DIRS = ("node_modules", "__pycache__", "checkpoints", "tensorboard", "site-packages")
MAX_CHOICES = 200


@dataclass(frozen=True)
class Roots:
    """The project folder (relative paths start here; runs' working directory) and the runs folder."""

    project: Path
    runs: Path

    def run_dir(self, name: str) -> Path:
        """The folder of run `name`, a direct child of the runs folder."""
        if not isinstance(name, str) or not RUN_NAME.match(name):
            raise UiError(f"run name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return self.runs / name

    def existing_run(self, name: str) -> Path:
        folder = self.run_dir(name)
        if not folder.is_dir():
            raise UiError(f"no run {name!r} under {self.runs}", status=404)
        return folder

    def inside(self, path: Path) -> bool:
        real = path.resolve()
        return any(real.is_relative_to(root.resolve()) for root in (self.project, self.runs))


def _get(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _is_local(value: str, roots: Roots) -> bool:
    """Does a model value name a local folder (rather than a built-in name or a Hub id)?"""
    return Path(value).is_absolute() or value.startswith(("./", "../", "~")) or (roots.project / value).exists()


def _outside(key: str, value: Any, roots: Roots, model_like: bool) -> str | None:
    if not isinstance(value, str) or not value:
        return None  # wrong types are the config's to report
    if "\x00" in value:
        return f"{key}: the path holds a NUL byte"
    if model_like and not _is_local(value, roots):
        return None
    path = Path(value).expanduser()
    path = path if path.is_absolute() else roots.project / path
    if roots.inside(path):
        return None
    return (f"{key}: {value} is outside the project ({roots.project}) and the runs folder ({roots.runs}); "
            "give a path inside one of them")


def path_problems(raw: dict[str, Any], roots: Roots) -> list[str]:
    """Every path in a config dict that leads outside the project and the runs folder."""
    problems = []
    checks = [(k, _get(raw, k), False) for k in FILE_KEYS] + [(k, _get(raw, k), True) for k in MODEL_KEYS]
    mixture = _get(raw, "data.mixture")
    for i, entry in enumerate(mixture if isinstance(mixture, list) else []):
        if isinstance(entry, dict):
            checks += [(f"data.mixture[{i}].{k}", entry.get(k), False) for k in ("train", "validation", "test")]
    for key, value, model_like in checks:
        problem = _outside(key, value, roots, model_like)
        if problem:
            problems.append(problem)
    return problems


def _walk(root: Path, max_depth: int, skip: Path) -> Iterator[tuple[Path, list[str], list[str]]]:
    """os.walk without hidden folders, caches, checkpoints or the runs folder, at most `max_depth` deep."""
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        depth = len(here.relative_to(root).parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS and here / d != skip
                         and depth < max_depth)
        yield here, dirs, sorted(files)


def _is_model_folder(files: list[str]) -> bool:
    """config.json beside weights: a transformers model (or adapter) folder, whose JSON files are not data."""
    return ("config.json" in files or "adapter_config.json" in files) and \
        any(f.endswith((".safetensors", ".bin", ".gguf")) for f in files)


def data_files(roots: Roots, max_depth: int = 4) -> list[str]:
    """Data files under the project (relative paths), for the form's file choices."""
    found = []
    for folder, _, files in _walk(roots.project, max_depth, roots.runs):
        if not _is_model_folder(files):
            found += [str((folder / f).relative_to(roots.project)) for f in files if f.endswith(DATA_SUFFIXES)]
        if len(found) >= MAX_CHOICES:
            break
    return found[:MAX_CHOICES]


def model_folders(roots: Roots, max_depth: int = 3) -> list[str]:
    """transformers model folders (config.json beside weights) under the project."""
    found = []
    for folder, _, files in _walk(roots.project, max_depth, roots.runs):
        if "config.json" in files and _is_model_folder(files):
            found.append(str(folder.relative_to(roots.project)) if folder != roots.project else ".")
    return found[:MAX_CHOICES]
