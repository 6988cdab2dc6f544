"""The preference objective (`objective: dpo | orpo`): pairs of answers to one prompt, a loss that prefers
the chosen one (the losses are in preference_loss.py).

Each training unit is a pair. A micro-batch holds whole pairs, the chosen answers then the rejected ones,
in ONE forward: one padding-free row where the method allows it (`attention.padding_free`), else one
padded batch. Each answer is scored by the summed log-probability of its answer tokens (the prompt is
masked, as in supervised fine-tuning) through the same token loss as `objective: sft`.

DPO's reference model costs no second model. Its log-probabilities of each pair are computed once, under
`torch.no_grad`, and cached by pair:

- a fresh adapter: with the adapter disabled (`AdaptedModel.disable_adapter`), i.e. the base model, the first
  time a pair is met (the base does not change, so later epochs reuse them);
- `train.init_adapter` (the usual two-stage recipe: DPO from an SFT adapter) and `method: full`: with the
  starting weights, for every pair the run's steps will use and every validation pair, before the first
  step (the weights move from step 1 on), so full fine-tuning needs no frozen copy of the model in memory.

ORPO has no reference. The step's loss is the mean pair loss; metrics.jsonl gets the mean reward margin
and the preference accuracy (how often the chosen answer's reward beats the rejected one's).

Example:
    >>> objective = PreferenceObjective(load_config("configs/dpo.yaml", ["train.init_adapter=null"]))
    >>> prepared = objective.prepare(torch.float32, torch.device("cpu"))
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..adapters import AdaptedModel
from ..config import PACKABLE_METHODS, RunConfig
from ..data.batching import IGNORE_INDEX, collate, length_grouped_order
from ..data.datasets import TaskData
from ..data.preference import PairStats, PairTask, load_pairs, tokenize_pairs
from ..errors import ConfigError, DataError
from ..models import is_seq2seq, load_model
from .attention import enable_padding_free, flat_example
from .distributed import Distributed
from .loss import token_losses
from .objectives import MicroBatch, Prepared, Validation
from .preference_loss import PairScores, PreferenceSettings, pair_losses
from .setup import prepare_model
from .tokens import save_result

log = logging.getLogger(__name__)


def answer_tokens(example: Mapping[str, list[int]]) -> int:
    """Labelled positions of one example after the causal shift (its answer tokens)."""
    return sum(label != IGNORE_INDEX for label in example["labels"][1:])


def pair_batch(pairs: Sequence[Mapping[str, Any]], pad_id: int, flat: bool) -> dict[str, torch.Tensor]:
    """The chosen answers, then the rejected ones, of `pairs` as one padding-free row or one padded batch."""
    examples = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    return collate([flat_example(examples)], pad_id) if flat else collate(examples, pad_id)


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each example's answer tokens; `tokens` holds each example's count, in batch order."""
    per_token = -token_losses(model, batch)
    rows = torch.repeat_interleave(torch.arange(len(tokens), device=per_token.device), tokens.to(per_token.device))
    return torch.zeros(len(tokens), dtype=per_token.dtype, device=per_token.device).index_add(0, rows, per_token)


def pair_epoch_batches(pairs: Sequence[Mapping[str, Any]], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The pair indices of each step of `epoch`, grouped by length: a pure function of (seed, epoch)."""
    lengths = [len(p["chosen"]["input_ids"]) + len(p["rejected"]["input_ids"]) for p in pairs]
    return length_grouped_order(lengths, batch_size, random.Random(seed * 1000 + epoch))


def limit_pairs(pairs: list[dict[str, Any]], cfg: RunConfig) -> list[dict[str, Any]]:
    """`data.max_train_examples` pairs, sampled with the seed (all when unset)."""
    if cfg.data.max_train_examples is None:
        return pairs
    return random.Random(cfg.train.seed).sample(pairs, min(cfg.data.max_train_examples, len(pairs)))


def run_micro_batches(cfg: RunConfig, tokenizer: Any) -> list[list[dict[str, list[int]]]]:
    """The examples of every micro-batch of a preference run, in training order (chosen answers, then rejected):
    what `peftkit estimate` sizes. Twice the rows of an SFT step of as many examples."""
    task = load_pairs(cfg.data, cfg.preference, cfg.train.seed)
    pairs = limit_pairs(tokenize_pairs(task.train, tokenizer, task, cfg.data.max_length)[0], cfg)
    if not pairs:
        raise DataError(f"{task.name}: no usable training pair; fix the rows or raise data.max_length")
    per_epoch = math.ceil(len(pairs) / cfg.train.batch_size)
    steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * per_epoch))
    size = cfg.train.micro_batch_size or cfg.train.batch_size
    out = []
    for step in range(steps):
        epoch, index = divmod(step, per_epoch)
        ids = pair_epoch_batches(pairs, cfg.train.batch_size, cfg.train.seed, epoch)[index]
        for start in range(0, len(ids), size):
            piece = [pairs[i] for i in ids[start : start + size]]
            out.append([p["chosen"] for p in piece] + [p["rejected"] for p in piece])
    return out


class PreferenceObjective:
    """DPO / IPO / ORPO on prompt, chosen, rejected pairs (see the module docstring)."""

    count_unit = "pairs"
    name = "dpo"  # each instance names its own objective (dpo or orpo) in __init__
    units: list[dict[str, Any]] = []  # the loop reads it after prepare(); __init__ gives each instance its own list

    def __init__(self, cfg: RunConfig) -> None:
        p = cfg.preference
        self.cfg = cfg
        self.name = cfg.objective
        self.settings = PreferenceSettings(cfg.objective, p.beta, p.loss, p.orpo_lambda, p.sft_weight)
        self.task: PairTask = load_pairs(cfg.data, p, cfg.train.seed)  # rows first: a bad file fails before the model loads
        self.units: list[dict[str, Any]] = []
        self.validation: list[dict[str, Any]] = []
        self.stats = PairStats()
        self.tokenizer: Any = None
        self.pad_id = 0
        self.flat = False
        self.reference: dict[tuple[str, int], tuple[float, float]] = {}
        self.reference_model: nn.Module | None = None
        """Where a missing reference comes from: the adapted model (adapter disabled); None once all are cached."""

    def prepare(self, dtype: torch.dtype, device: torch.device) -> Prepared:
        cfg = self.cfg
        model, self.tokenizer = load_model(cfg.model, dtype=dtype, device=device)
        if is_seq2seq(model):
            raise ConfigError(f"objective {cfg.objective}: the model is encoder-decoder; preference tuning here needs a decoder-only model")
        self.pad_id = self.tokenizer.pad_token_id
        length = cfg.data.max_length
        self.units, self.stats = tokenize_pairs(self.task.train, self.tokenizer, self.task, length)
        self.validation, _ = tokenize_pairs(self.task.validation, self.tokenizer, self.task, length, "validation")
        self.units = limit_pairs(self.units, cfg)
        if not self.units:
            raise DataError(f"{self.task.name}: no usable training pair (identical answers: {self.stats.identical}, "
                            f"answers cut to nothing: {self.stats.empty}); fix the rows or raise data.max_length")
        for split, pairs in (("train", self.units), ("validation", self.validation)):
            for i, pair in enumerate(pairs):
                pair["key"] = (split, i)
        log.info("data %s: %d training pairs, %d validation pairs", self.task.name, len(self.units), len(self.validation))
        torch.manual_seed(cfg.train.seed)  # the same method init on every rank
        adapted = prepare_model(cfg, model)
        self.flat = cfg.train.padding_free and cfg.method in PACKABLE_METHODS and enable_padding_free(model)
        if self.settings.needs_reference:
            self.reference_model = adapted
            if cfg.method == "full" or cfg.train.init_adapter:  # the reference is the STARTING weights: score them all now
                self.cache_reference(adapted, self.visited_pairs() + self.validation, contextlib.nullcontext)
                self.reference_model = None
        return Prepared(model, self.tokenizer, adapted)

    def visited_pairs(self) -> list[dict[str, Any]]:
        """The training pairs the run's steps will use (as the loop counts steps): with `train.max_steps`, maybe few."""
        train = self.cfg.train
        per_epoch = math.ceil(len(self.units) / train.batch_size)
        total = train.max_steps or max(1, math.ceil(train.epochs * per_epoch))
        used: set[int] = set()
        for epoch in range(math.ceil(total / per_epoch)):
            for batch in self.epoch_batches(epoch)[: total - epoch * per_epoch]:
                used.update(batch)
        return [self.units[i] for i in sorted(used)]

    def cache_reference(self, model: nn.Module, pairs: Sequence[Mapping[str, Any]], context: Any) -> None:
        """Reference log-probs of `pairs` not cached yet, under no_grad inside `context()`, in micro-batches."""
        todo = [p for p in pairs if p["key"] not in self.reference]
        size = self.cfg.train.micro_batch_size or self.cfg.train.batch_size
        device = next(model.parameters()).device
        with torch.no_grad(), context():
            for start in range(0, len(todo), size):
                piece = todo[start : start + size]
                inputs = self.inputs(piece, device)
                sums = sequence_logps(model, inputs["batch"], inputs["tokens"]).tolist()
                for j, pair in enumerate(piece):
                    self.reference[pair["key"]] = (sums[j], sums[len(piece) + j])

    def inputs(self, pairs: Sequence[Mapping[str, Any]], device: torch.device) -> dict[str, Any]:
        batch = {k: v.to(device, non_blocking=True) for k, v in pair_batch(pairs, self.pad_id, self.flat).items()}
        tokens = torch.tensor([answer_tokens(p[side]) for side in ("chosen", "rejected") for p in pairs])
        return {"batch": batch, "tokens": tokens, "keys": [p["key"] for p in pairs]}

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        return pair_epoch_batches(self.units, self.cfg.train.batch_size, self.cfg.train.seed, epoch)

    def micro_batches(self, units: Sequence[Mapping[str, Any]], size: int | None, device: torch.device) -> list[MicroBatch]:
        size = size or len(units)
        out = []
        for start in range(0, len(units), size):
            piece = units[start : start + size]
            inputs = self.inputs(piece, device)
            mask = inputs["batch"]["attention_mask"]
            out.append(MicroBatch(inputs, len(piece), int(mask.sum()), mask.numel()))
        return out

    def scores(self, model: nn.Module, inputs: dict[str, Any]) -> PairScores:
        """The pairs' answer log-probs under `model` (in the graph) and, for DPO, the cached reference's."""
        if self.reference_model is not None and any(k not in self.reference for k in inputs["keys"]):
            self.cache_reference_batch(inputs)
        sums, tokens = sequence_logps(model, inputs["batch"], inputs["tokens"]), inputs["tokens"].to(inputs["batch"]["input_ids"].device)
        n = len(inputs["keys"])
        scores = PairScores(sums[:n], sums[n:], tokens[:n], tokens[n:])
        if self.settings.needs_reference:
            ref = torch.tensor([self.reference[k] for k in inputs["keys"]], dtype=sums.dtype, device=sums.device)
            scores.ref_chosen, scores.ref_rejected = ref[:, 0], ref[:, 1]
        return scores

    def cache_reference_batch(self, inputs: dict[str, Any]) -> None:
        """A fresh adapter's reference: this micro-batch scored with the adapter disabled (the base model)."""
        with torch.no_grad(), self.reference_model.disable_adapter():
            sums = sequence_logps(self.reference_model, inputs["batch"], inputs["tokens"]).tolist()
        n = len(inputs["keys"])
        for j, key in enumerate(inputs["keys"]):
            self.reference[key] = (sums[j], sums[n + j])

    def loss(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        losses, chosen_reward, rejected_reward = pair_losses(self.settings, self.scores(model, inputs))
        margin = chosen_reward - rejected_reward
        return losses.sum(), {"reward_margin": margin.sum(), "reward_accuracy": (margin > 0).float().sum()}

    def describe(self, unit: Mapping[str, Any]) -> str:
        return f"pair {unit['key'][1]}: {self.tokenizer.decode(unit['chosen']['input_ids'][:24])!r}..."

    def validate(self, forward: nn.Module, adapted: AdaptedModel, step: int) -> Validation | None:
        if not self.validation:
            return None
        device = next(adapted.parameters()).device
        size = self.cfg.train.micro_batch_size or self.cfg.train.batch_size
        totals = {"loss": 0.0, "reward_margin": 0.0, "reward_accuracy": 0.0}
        forward.eval()
        with torch.no_grad():
            for batch in self.micro_batches(self.validation, size, device):
                loss_sum, metrics = forward(batch.inputs)
                totals["loss"] += float(loss_sum)
                for name, value in metrics.items():
                    totals[name] += float(value)
        forward.train()
        record = {f"val_{k}": v / len(self.validation) for k, v in totals.items()}
        log.info("step %d: validation %s loss %.4f, reward margin %.4f, preference accuracy %.3f", step, self.name,
                 record["val_loss"], record["val_reward_margin"], record["val_reward_accuracy"])
        return Validation(record, record["val_loss"])

    def save(self, adapted: AdaptedModel, out: Path, info: Distributed) -> Path:
        shape = "messages" if self.task.shape == "chat" else "prompt_response"
        task = TaskData([], [], [], self.task.format, shape, self.task.chosen, self.task.name)
        return save_result(self.cfg, adapted, self.tokenizer, [task], out, info)

    def report(self, adapted: AdaptedModel, out: Path, info: Distributed) -> dict[str, Any]:
        return {"truncation": self.stats.to_dict()}

