"""One optimizer step's gradients: micro-batches (gradient accumulation) across one or many ranks,
for any objective.

Every micro-batch's loss SUM is divided by the step's TOTAL count of loss units (target tokens,
examples, pairs: all micro-batches, all ranks). Dividing each micro-batch by its own count instead
would weight a token in a short micro-batch more than one in a long micro-batch; this way 4
micro-batches of 2 give the gradients of one batch of 8. Extra metrics (sums) are divided the same way.

Example:
    >>> forward = ObjectiveForward(TokenBatches(pad_id=2), adapted)
    >>> result = accumulate_gradients(forward, examples, micro_batch_size=2)
    >>> result.loss  # mean loss per target token of the whole step
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from .distributed import Distributed, no_sync, shard, sum_over_ranks
from .objectives import objective_of


@dataclass
class StepResult:
    loss: float
    """Mean loss per count unit over the whole step (all micro-batches, all ranks)."""
    count: int
    """Loss units of the step (target tokens for the token loss)."""
    tokens: int
    """Real (non-padding) input tokens of the step."""
    positions: int
    """Input positions including padding (tokens / positions = 1 - padding fraction)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The objective's extra metrics, per count unit."""

    @property
    def target_tokens(self) -> int:
        """The count, under the token loss's name for it."""
        return self.count


def accumulate_gradients(
    forward: nn.Module, global_batch: Sequence[Any], micro_batch_size: int | None,
    device: torch.device = torch.device("cpu"), info: Distributed = Distributed(),
) -> StepResult:
    """Backward over this rank's share of `global_batch` in micro-batches; gradients add up in `.grad`.

    `forward` is an `ObjectiveForward` (possibly DDP / FSDP wrapped); its objective builds the
    micro-batches and scores them. A rank whose share is empty (a short last batch) runs the first
    unit with weight 0, so every rank joins the gradient all-reduce.
    """
    objective = objective_of(forward)
    mine = [global_batch[i] for i in shard(range(len(global_batch)), info)]
    weight = 1.0 if mine else 0.0
    batches = objective.micro_batches(mine or global_batch[:1], micro_batch_size, device)
    local = [sum(b.count for b in batches), sum(b.tokens for b in batches), sum(b.positions for b in batches)] if mine else [0, 0, 0]
    (total_count,) = sum_over_ranks([local[0]], info)
    scale = weight * info.world_size / max(1.0, total_count)  # DDP / FSDP average over ranks: undo it
    local_loss, local_metrics = 0.0, {}
    for i, batch in enumerate(batches):
        with no_sync(forward, info, sync=i == len(batches) - 1):
            loss_sum, metrics = forward(batch.inputs)
            (loss_sum * scale).backward()
        local_loss += float(loss_sum.detach()) * weight
        for name, value in metrics.items():
            local_metrics[name] = local_metrics.get(name, 0.0) + float(value) * weight
    names = sorted(local_metrics)
    loss, tokens, positions, *metric_sums = sum_over_ranks([local_loss, local[1], local[2], *(local_metrics[n] for n in names)], info)
    per_unit = {n: v / max(1.0, total_count) for n, v in zip(names, metric_sums)}
    return StepResult(loss / max(1.0, total_count), int(total_count), int(tokens), int(positions), per_unit)
