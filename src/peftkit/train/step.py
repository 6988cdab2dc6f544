"""One optimizer step's gradients: micro-batches (gradient accumulation) across one or many ranks.

Every micro-batch's summed loss is divided by the step's TOTAL target-token count (all
micro-batches, all ranks). Dividing each micro-batch by its own count instead would weight a
token in a short micro-batch more than one in a long micro-batch; this way 4 micro-batches of 2
give the gradients of one batch of 8.

Example:
    >>> result = accumulate_gradients(LossForward(adapted), examples, micro_batch_size=2, pad_id=2)
    >>> result.loss  # mean loss per target token of the whole step
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from ..data.batching import collate
from .attention import flat_example
from .distributed import Distributed, no_sync, shard, sum_over_ranks
from .loss import target_count


@dataclass
class StepResult:
    loss: float
    """Mean loss per target token over the whole step (all micro-batches, all ranks)."""
    target_tokens: int
    tokens: int
    """Real (non-padding) input tokens of the step."""
    positions: int
    """Input positions including padding (tokens / positions = 1 - padding fraction)."""


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def micro_batches(examples: Sequence[Mapping], size: int | None) -> list[Sequence[Mapping]]:
    size = size or len(examples)
    return [examples[i : i + size] for i in range(0, len(examples), size)]


def accumulate_gradients(
    forward: nn.Module, global_batch: Sequence[Mapping], micro_batch_size: int | None, pad_id: int,
    seq2seq: bool = False, device: torch.device = torch.device("cpu"), info: Distributed = Distributed(),
    flat: bool = False,
) -> StepResult:
    """Backward over this rank's share of `global_batch` in micro-batches; gradients add up in `.grad`.

    A rank whose share is empty (a short last batch) runs the first example with weight 0, so
    every rank joins the gradient all-reduce. `flat`: each micro-batch is one padding-free row
    (see `attention.padding_free`, which must be active).
    """
    mine = [global_batch[i] for i in shard(range(len(global_batch)), info)]
    weight = 1.0 if mine else 0.0
    chunks = micro_batches(mine or global_batch[:1], micro_batch_size)
    batches = [to_device(collate([flat_example(m)], pad_id) if flat else collate(m, pad_id, seq2seq), device) for m in chunks]
    local_count = sum(target_count(b, seq2seq) for b in batches) if mine else 0
    local_tokens = sum(int(b["attention_mask"].sum()) for b in batches) if mine else 0
    local_positions = sum(b["attention_mask"].numel() for b in batches) if mine else 0
    (total_count,) = sum_over_ranks([local_count], info)
    scale = weight * info.world_size / max(1.0, total_count)  # DDP / FSDP average over ranks: undo it
    local_loss = 0.0
    for i, batch in enumerate(batches):
        with no_sync(forward, info, sync=i == len(batches) - 1):
            loss_sum = forward(batch)
            (loss_sum * scale).backward()
        local_loss += float(loss_sum.detach()) * weight
    loss, tokens, positions = sum_over_ranks([local_loss, local_tokens, local_positions], info)
    return StepResult(loss / max(1.0, total_count), int(total_count), int(tokens), int(positions))
