"""The systems an evaluation compares: the base model, adapters over it, full fine-tune folders.

Adapters that share a base are attached to ONE loaded copy of it under their own names and
switched with `set_adapter`; the base column runs the same copy with adapters disabled, so
the base is loaded once however many adapters are compared.

Example:
    >>> systems = describe_systems(["runs/lora/adapter", "runs/full/adapter"], include_base=True)
    >>> pool = SystemPool(systems)
    >>> for system in systems:
    ...     with pool.use(system) as model:
    ...         ...  # model.model, model.tokenizer
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..adapters import CONFIG_NAME, AdaptedModel, read_adapter_config, read_adapter_weights, read_sidecar
from ..artifacts import artifact_kind, load_artifact, resize_for_adapter
from ..errors import AdapterError, PeftkitError
from ..models import load_model, resolve_device, resolve_model_path
from ..precision import resolve_dtype

log = logging.getLogger(__name__)


@dataclass
class System:
    """One column of the comparison."""

    name: str
    kind: str
    """base | adapter | full | recorded (outputs read from an earlier results.json)"""
    path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    """The folder's peftkit.json (run config, prompt format), {} for the base."""
    base_model: str | None = None
    """What the base (or an adapter's base) loads from."""
    train_seconds: float | None = None
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    trainable_pct: float | None = None
    """Filled when the system is loaded (it needs the base's parameter count)."""

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "path": str(self.path) if self.path else None,
            "base_model": self.base_model, "trainable_pct": self.trainable_pct, "train_seconds": self.train_seconds,
        }


def is_full_model_folder(path: Path) -> bool:
    """A transformers checkpoint (what `method: full` writes) rather than an adapter folder."""
    return (path / "config.json").is_file() and not (path / CONFIG_NAME).is_file()


def run_log(path: Path) -> tuple[float | None, list[tuple[int, float]]]:
    """(training seconds, [(step, loss)]) from the `metrics.jsonl` beside an adapter folder."""
    file = path.parent / "metrics.jsonl"
    if not file.is_file():
        return None, []
    seconds, curve = None, []
    for line in file.read_text(encoding="utf-8").splitlines():
        record = json.loads(line) if line.strip() else {}
        if "loss" in record and "step" in record:
            curve.append((int(record["step"]), float(record["loss"])))
        if record.get("elapsed_s") is not None:
            seconds = float(record["elapsed_s"])
    return seconds, curve


def system_name(path: Path, taken: set[str]) -> str:
    """`runs/lora/adapter` -> `lora`; a folder named otherwise keeps its name; duplicates get -2, -3."""
    stem = path.parent.name if path.name == "adapter" and path.parent.name else path.name
    name, n = stem or "system", 2
    while name in taken:
        name, n = f"{stem}-{n}", n + 1
    return name


def split_named(spec: str | Path) -> tuple[str | None, Path]:
    """`lora=runs/x/adapter` -> ("lora", path); a bare path -> (None, path)."""
    text = str(spec)
    name, sep, rest = text.partition("=")
    if sep and name.replace("-", "_").isidentifier() and not Path(text).exists():
        return name, Path(rest)
    return None, Path(text)


def describe_system(spec: str | Path, taken: set[str], model: str | None = None) -> System:
    """Read what a trained folder (`PATH` or `NAME=PATH`) says about itself, without loading weights."""
    given, path = split_named(spec)
    if given in taken:
        raise PeftkitError(f"system name {given!r} is taken; names must be unique and not 'base'")
    artifact_kind(path)  # a missing folder, a file or a folder of neither kind: one message, as every verb gives
    meta = read_sidecar(path)
    seconds, curve = run_log(path)
    if is_full_model_folder(path):
        base = model or (meta.get("run_config") or {}).get("model")
        return System(given or system_name(path, taken), "full", path, meta, base, seconds, curve, trainable_pct=100.0)
    _, raw = read_adapter_config(path)
    base = model or raw.get("base_model_name_or_path")
    if not base:
        raise AdapterError(f"{path}: adapter_config.json records no base_model_name_or_path; pass --model")
    return System(given or system_name(path, taken), "adapter", path, meta, base, seconds, curve)


def describe_systems(paths: list[str | Path], include_base: bool, model: str | None = None) -> list[System]:
    """The base first (when asked), then each folder in the order given."""
    taken: set[str] = {"base"}
    systems = []
    for path in paths:
        system = describe_system(path, taken, model)
        taken.add(system.name)
        systems.append(system)
    if include_base:
        base = model or next((s.base_model for s in systems if s.base_model), None)
        if base is None:
            raise PeftkitError("no base model to compare with: pass --model NAME or an adapter folder")
        systems.insert(0, System("base", "base", None, {}, base, trainable_pct=0.0))
    if not systems:
        raise PeftkitError("nothing to evaluate: pass --adapter PATH (repeatable) and/or --base with --model")
    return systems


@dataclass
class LoadedSystem:
    """What scoring code needs: a model to run and its tokenizer."""

    model: nn.Module
    tokenizer: Any


class SystemPool:
    """Loads each base once with all its adapters attached; activates one system at a time."""

    def __init__(self, systems: list[System], device: str = "auto", precision: str = "fp32") -> None:
        self.systems = systems
        self.device = resolve_device(device)
        self.precision = precision
        self.dtype = resolve_dtype(precision, self.device)
        self._base_path: str | None = None
        self._adapted: AdaptedModel | None = None
        self._tokenizer: Any = None
        self._names: dict[str, str] = {}

    def _load_base(self, base_path: str) -> None:
        """Load the base at `base_path` and attach every adapter of the pool that sits on it."""
        self._adapted = None  # free the previous base before loading the next
        model, tokenizer = load_model(base_path, dtype=self.dtype, device=self.device)
        adapted = AdaptedModel(model)
        base_params = sum(p.numel() for p in model.parameters())
        for i, system in enumerate(self.systems):
            if system.kind != "adapter" or resolve_model_path(system.base_model) != base_path:
                continue
            name = f"system_{i}"
            tokenizer = resize_for_adapter(model, tokenizer, system.path)  # added tokens: embeddings grow to fit
            adapted.load_adapter(system.path, name=name)
            adapter_params = sum(t.numel() for t in read_adapter_weights(system.path).values())
            system.trainable_pct = 100.0 * adapter_params / (base_params + adapter_params)
            self._names[system.name] = name
        adapted.to(self.device)
        adapted.eval()
        self._adapted, self._tokenizer, self._base_path = adapted, tokenizer, base_path

    @contextmanager
    def use(self, system: System) -> Iterator[LoadedSystem]:
        """The system's model, ready for generation or scoring inside the block."""
        if system.kind == "full":
            artifact = load_artifact(system.path, device=str(self.device), precision=self.precision)
            yield LoadedSystem(artifact.model, artifact.tokenizer)
            return
        base_path = resolve_model_path(system.base_model)
        if self._base_path != base_path:
            log.info("loading base %s", system.base_model)
            self._load_base(base_path)
        assert self._adapted is not None
        if system.kind == "adapter":
            self._adapted.set_adapter(self._names[system.name])
            context = nullcontext()
        else:
            context = self._adapted.disable_adapter() if self._adapted.adapter_configs else nullcontext()
        with context, torch.no_grad():
            yield LoadedSystem(self._adapted, self._tokenizer)
