"""Training checkpoints: trainable weights, optimizer, scheduler, RNG states and the data position.

Each checkpoint is a folder written atomically (`checkpoints/step-N/`); the newest `keep` are
kept. Resuming restores everything (the data order is a pure function of seed and epoch, so the
step number is the data position), and the resumed run continues bit-identically on CPU.
Under torchrun every rank takes part in gathering the state; rank 0 alone writes it.
"""

from __future__ import annotations

import json
import os
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
from .distributed import Distributed, barrier, full_tensor, gather_objects, load_into

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
    """Full (unsharded) copies of the trainable parameters, by name."""
    return {n: full_tensor(p.detach()).cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise PeftkitError(f"{source}: checkpoint does not match this run's model (e.g. {missing[0]}); same config?")
    with torch.no_grad():
        for name, tensor in weights.items():
            load_into(params[name], tensor)


def _optimizer_state(root: nn.Module, optimizer: torch.optim.Optimizer, info: Distributed) -> dict[str, Any]:
    if info.kind != "fsdp":
        return optimizer.state_dict()  # one process, or DDP replicas holding the same state
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(root, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_optimizer_state(root: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], info: Distributed) -> None:
    if info.kind != "fsdp":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(root, optimizer, state, options=StateDictOptions(full_state_dict=True))


def save_checkpoint(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, progress: dict[str, Any],
    keep: int = 3, info: Distributed = Distributed(), root: nn.Module | None = None,
) -> Path:
    """Write `folder/step-N` atomically and prune all but the newest `keep` checkpoints.

    `model` names the weights (the AdaptedModel); `root` is what FSDP sharded (for the optimizer).
    """
    path = folder / f"step-{progress['step']}"
    weights = trainable_state(model)
    optim = _optimizer_state(root if root is not None else model, optimizer, info)
    rngs = gather_objects(rng_state(), info)
    if info.is_main:
        with atomic_dir(path) as tmp:
            save_file(weights, str(tmp / WEIGHTS_FILE))
            with open(tmp / OPTIMIZER_FILE, "wb") as f:  # a Python file: a full disk surfaces as OSError(ENOSPC)
                torch.save({"optimizer": optim, "scheduler": scheduler.state_dict(), "rng": rngs}, f)
            (tmp / STATE_FILE).write_text(json.dumps({**progress, "world_size": info.world_size}, indent=2, sort_keys=True) + "\n")
        for old in list_checkpoints(folder)[:-keep]:
            prune(old)
    barrier(info)
    return path


def prune(path: Path) -> None:
    """Delete a checkpoint folder so that a kill midway never leaves part of it under its name: it is renamed
    to a temp name first (which `io.recover_interrupted_writes` clears), then removed."""
    doomed = path.with_name(f".{path.name}.pruned.tmp")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp folders of interrupted writes are ignored)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step-*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    info: Distributed = Distributed(), root: nn.Module | None = None,
) -> dict[str, Any]:
    """Restore a checkpoint in place; returns its progress record (step, best score, tokens...)."""
    try:
        weights = load_file(str(path / WEIGHTS_FILE))
        extra = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        progress = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise PeftkitError(f"{path}: checkpoint is unreadable ({exc}); delete it to resume from the previous one") from None
    if progress.get("world_size", 1) != info.world_size:
        raise PeftkitError(
            f"{path}: written by {progress.get('world_size', 1)} process(es), resumed with {info.world_size}; "
            "resume with the same number of processes (the data split and RNG streams depend on it)"
        )
    load_trainable_state(model, weights, path)
    _load_optimizer_state(root if root is not None else model, optimizer, extra["optimizer"], info)
    scheduler.load_state_dict(extra["scheduler"])
    set_rng_state(extra["rng"][info.rank])
    return progress


def save_best(path: Path, model: nn.Module, record: dict[str, Any], info: Distributed = Distributed()) -> None:
    """`output_dir/best/`: the trainable weights of the best validation step and its scores."""
    weights = trainable_state(model)
    if info.is_main:
        with atomic_dir(path) as tmp:
            save_file(weights, str(tmp / WEIGHTS_FILE))
            (tmp / "best.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    barrier(info)


def load_best(path: Path, model: nn.Module) -> dict[str, Any]:
    """Put the best step's weights back into `model`; returns its record."""
    load_trainable_state(model, load_file(str(path / WEIGHTS_FILE)), path)
    return json.loads((path / "best.json").read_text())
