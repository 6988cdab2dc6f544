"""One process or many (torchrun): DDP replicas or FSDP2 shards, with the same config.

The global batch (`train.batch_size`) is split across ranks; every rank divides its summed loss
by the step's total target-token count (all ranks, all micro-batches), and DDP / FSDP average
gradients over ranks, so the loss is scaled by the world size to make that average a sum.
Only rank 0 writes files and draws the progress bar.

Example (2 processes on CPU):
    torchrun --nproc_per_node 2 -m peftkit.cli train cfg.yaml
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as torch_dist
from torch import nn

from ..errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Distributed:
    """Where this process stands: `kind` is none | ddp | fsdp."""

    kind: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def setup(choice: str, device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the torchrun process group when launched by torchrun; pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(), device
    if choice == "none":
        raise ConfigError(f"train.distributed is 'none' but torchrun started {world_size} processes; use auto, ddp or fsdp")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    kind = "fsdp" if choice == "fsdp" else "ddp"
    info = Distributed(kind, torch_dist.get_rank(), world_size, local_rank)
    log.info("rank %d of %d (%s, %s)", info.rank, world_size, kind, device)
    return info, device


def teardown(info: Distributed) -> None:
    if info.active and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def shard(indices: Sequence[int], info: Distributed) -> list[int]:
    """This rank's share of a global batch (rank r takes every world_size-th example from r)."""
    return list(indices[info.rank :: info.world_size])


def sum_over_ranks(values: Sequence[float], info: Distributed) -> list[float]:
    """Element-wise sums over all ranks (one all-reduce for several numbers)."""
    if not info.active:
        return [float(v) for v in values]
    device = "cuda" if torch_dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    torch_dist.all_reduce(tensor)
    return tensor.tolist()


def gather_objects(obj: Any, info: Distributed) -> list[Any]:
    """`obj` from every rank, in rank order (for RNG states in checkpoints)."""
    if not info.active:
        return [obj]
    out: list[Any] = [None] * info.world_size
    torch_dist.all_gather_object(out, obj)
    return out


def barrier(info: Distributed) -> None:
    if info.active:
        torch_dist.barrier()


def wrap(module: nn.Module, info: Distributed, device: torch.device) -> nn.Module:
    """DDP around the loss module, or FSDP2 `fully_shard` on each transformer block, then the root."""
    if info.kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)
    if info.kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        block_names = set(getattr(_transformer(module), "_no_split_modules", None) or [])
        blocks = [m for m in module.modules() if type(m).__name__ in block_names]
        if not blocks:
            raise ConfigError(f"train.distributed: fsdp found no transformer blocks to shard in {type(module).__name__}; use ddp")
        for block in blocks:
            fully_shard(block)
        fully_shard(module)
    return module


def _transformer(module: nn.Module) -> nn.Module:
    """The transformers model inside ObjectiveForward(objective, AdaptedModel(model))."""
    while hasattr(module, "model") and not hasattr(module, "_no_split_modules"):
        module = module.model
    return module


@contextlib.contextmanager
def no_sync(module: nn.Module, info: Distributed, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if sync or info.kind == "none":
        yield
    elif info.kind == "ddp":
        with module.no_sync():  # type: ignore[operator]
            yield
    else:
        module.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)  # type: ignore[operator]


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (possibly FSDP-sharded) DTensor; collective, so every rank calls it."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def load_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full tensor into a parameter, keeping only this rank's shard when it is a DTensor."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)
    param.copy_(value)
