"""Training checkpoints: trainable weights, optimizer, scheduler, RNG states and the data position.

Each checkpoint is a folder written atomically (`checkpoints/step-N/`); the last `keep` are kept.
Resuming restores everything, so the resumed run continues bit-identically on CPU.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import PeftkitError
from ..io import atomic_dir

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, progress: dict[str, Any], keep: int = 3
) -> Path:
    """Write `folder/step-N` atomically and prune all but the newest `keep` checkpoints."""
    path = folder / f"step-{progress['step']}"
    with atomic_dir(path) as tmp:
        save_file(trainable_state(model), str(tmp / WEIGHTS_FILE))
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
            tmp / OPTIMIZER_FILE,
        )
        (tmp / STATE_FILE).write_text(json.dumps(progress, indent=2, sort_keys=True) + "\n")
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp folders of interrupted writes are ignored)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step-*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore a checkpoint in place; returns its progress record (step, epoch, batch index...)."""
    try:
        weights = load_file(str(path / WEIGHTS_FILE))
        extra = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        progress = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise PeftkitError(f"{path}: checkpoint is unreadable ({exc}); delete it to resume from the previous one") from None
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise PeftkitError(f"{path}: checkpoint does not match this run's model (e.g. {missing[0]}); same config?")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    set_rng_state(extra["rng"])
    return progress
