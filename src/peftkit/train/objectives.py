"""What the one training loop optimises: the `Objective` interface.

`loop.py` is the only training loop. It owns everything objectives share: seeding, device and
dtype, the output folder, resume, the optimizer and schedule, gradient accumulation over
micro-batches and ranks, the NaN / Inf guard BEFORE the optimizer step, SIGINT / SIGTERM,
full-disk handling, checkpoints, metrics.jsonl and the progress bar. An objective owns what
differs between tasks:

- `prepare`: read the rows, load the base model, attach the method (`train.setup.prepare_model`),
  and build the training UNITS (tokenized examples or packs, encoder rows, preference pairs...);
- `epoch_batches`: which units form each optimizer step of an epoch (a pure function of the seed
  and the epoch, so a resume replays it);
- `micro_batches`: one step's units (this rank's share) as tensors on the device, in pieces of at
  most `train.micro_batch_size` units, each with its COUNT of loss units;
- `loss`: a micro-batch's loss as a SUM over its count, plus extra metrics (also sums);
- `validate`: validation metrics and the score `train.select_by` keeps the best weights by;
- `save` and `report`: the run's final artifact, and what the run reports after training.

The step's loss is sum(loss sums) / sum(counts) over every micro-batch of every rank, so
micro-batching changes nothing but memory (see step.py). Extra metrics are normalised the same
way: an objective returns `{"reward_margin": sum of margins}` and metrics.jsonl gets the mean
per count unit.

Adding an objective (DPO, ORPO...): write a class with these attributes and methods (a Protocol,
no base class to inherit) in its own file under train/, and add it to `loop.OBJECTIVES`. For
example a DPO objective would:

- reuse the token objective's data and model setup (tokens.TokenBatches collates and runs padding-free
  rows), and make ONE UNIT per pair (prompt + chosen, prompt + rejected): ranks and micro-batches
  split a step between units, so both answers of a pair always share a micro-batch (and can share
  one padding-free row); `count` = pairs;
- in `loss`, score both answers with the adapter, then again with `adapted.disable_adapter()`
  under `torch.no_grad()` (the reference model for free; full fine-tuning keeps a frozen copy made
  in `prepare`), and return `(sum of pair losses, {"reward_margin": ..., "reward_accuracy": ...})`;
- in `validate`, return the validation pairs' loss as the score and the metrics in the record.

`loss` runs inside `ObjectiveForward.forward`, the module DDP / FSDP wrap, so everything it
computes (a reference forward included) is one forward to them.

Example:
    >>> objective = OBJECTIVES[cfg.task](cfg)          # in loop.py
    >>> prepared = objective.prepare(torch.float32, torch.device("cpu"))
    >>> forward = ObjectiveForward(objective, prepared.adapted)
    >>> pieces = objective.micro_batches([objective.units[i] for i in objective.epoch_batches(0)[0]], None, device)
    >>> loss_sum, metrics = forward(pieces[0].inputs); loss_sum / pieces[0].count
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
from torch import nn

from ..adapters import AdaptedModel
from .distributed import Distributed


@dataclass
class MicroBatch:
    """One forward's worth of a step, ready on the device."""

    inputs: Any
    """What `Objective.loss` reads (a dict of tensors for the token loss)."""
    count: int
    """Loss units it holds (target tokens, examples, pairs): the step's loss is the sum over micro-batches
    of the loss sums divided by the sum of their counts."""
    tokens: int
    """Real (non-padding) input tokens, for tokens/s."""
    positions: int
    """Input positions including padding (tokens / positions = 1 - padding fraction)."""


@dataclass
class Prepared:
    """What `Objective.prepare` hands the loop."""

    model: nn.Module
    """The base model (with the method's layers inserted)."""
    tokenizer: Any
    adapted: AdaptedModel
    """The model with its method attached: what trains, checkpoints and saves."""
    added_tokens: list[str] = field(default_factory=list)
    """Special tokens added to the tokenizer (the embeddings were resized)."""


@dataclass
class Validation:
    """One validation pass."""

    record: dict[str, Any]
    """Logged to metrics.jsonl beside the step (keys start with `val_`)."""
    score: float | None
    """The value `train.select_by` compares (best weights, early stopping); None: nothing to select on."""


class StepObjective(Protocol):
    """The part of an objective one optimizer step needs (step.accumulate_gradients): batches and their loss."""

    count_unit: str
    """What `MicroBatch.count` counts; also the metrics.jsonl key of the step's count (`target_tokens`, `examples`)."""

    def micro_batches(self, units: Sequence[Any], size: int | None, device: torch.device) -> list[MicroBatch]:
        """`units` as micro-batches of at most `size` units (None: all in one), on `device`."""
        ...

    def loss(self, model: nn.Module, inputs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss summed over the micro-batch's count units, in the graph; extra metrics, also sums, detached)."""
        ...


class Objective(StepObjective, Protocol):
    """A training objective of the one loop (see the module docstring for how one plugs in)."""

    name: str
    """Short name, e.g. `sft`, `embedding`, `classification`, `dpo`."""
    units: Sequence[Any]
    """The training units (set by `prepare`); `epoch_batches` indexes into them."""

    def prepare(self, dtype: torch.dtype, device: torch.device) -> Prepared:
        """Read and check the data, load the model, attach the method, build `units` (the same on every rank)."""
        ...

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The unit indices of each optimizer step of `epoch`: a pure function of (seed, epoch)."""
        ...

    def describe(self, unit: Any) -> str:
        """A short, human-readable label of one training unit (named when its loss is NaN / Inf)."""
        ...

    def validate(self, forward: nn.Module, adapted: AdaptedModel, step: int) -> Validation | None:
        """Score the validation split (None when there is none); leaves the model in train mode."""
        ...

    def save(self, adapted: AdaptedModel, out: Path, info: Distributed) -> Path:
        """Write the final artifact (output_dir/adapter) and summary.json; returns the artifact folder."""
        ...

    def report(self, adapted: AdaptedModel, out: Path, info: Distributed) -> dict[str, Any]:
        """After saving: what the run reports (sample answers, test scores...), as TrainResult fields."""
        ...


class ObjectiveForward(nn.Module):
    """`forward(inputs) -> (loss_sum, metrics)`: the module DDP / FSDP wrap, so their hooks see one forward."""

    def __init__(self, objective: StepObjective, model: nn.Module) -> None:
        super().__init__()
        self.objective = objective
        self.model = model

    def forward(self, inputs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.objective.loss(self.model, inputs)


def objective_of(forward: nn.Module) -> StepObjective:
    """The objective of an ObjectiveForward, through a DDP wrapper (`.module`) if there is one."""
    return getattr(forward, "module", forward).objective

