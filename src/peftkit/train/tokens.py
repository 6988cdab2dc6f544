"""The token objective (`task: generation`, the default): cross-entropy on the labelled tokens of
causal and encoder-decoder models, the loss of supervised fine-tuning.

`TokenBatches` is the per-step half (collate, padding-free rows, the summed token loss): any
objective over tokenized examples (a preference objective's pairs, say) can reuse it.
`TokenObjective` adds the rest: tasks and templates, the model with added tokens and the method,
length-grouped epochs, validation loss / ROUGE-L, the adapter (or full model) with its
peftkit.json, and sample answers.

Example:
    >>> objective = TokenObjective(load_config("configs/default.yaml"))
    >>> prepared = objective.prepare(torch.float32, torch.device("cpu"))
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..adapters import AdaptedModel
from ..config import PACKABLE_METHODS, RunConfig
from ..data.batching import collate
from ..data.datasets import TaskData, load_tasks
from ..generate import Decoding, answer_rows, weights_label
from ..io import atomic_dir, atomic_write_json
from ..models import builtin_origin, is_seq2seq, load_model
from . import distributed
from .attention import enable_padding_free, flat_example
from .data import TrainData, build_train_data, epoch_batches
from .distributed import Distributed
from .loss import target_count, token_losses
from .objectives import MicroBatch, Prepared, Validation
from .setup import ADAPTER_NAME, add_special_tokens, prepare_model
from .validate import evaluate_loss, perplexity, validation_rouge_l

log = logging.getLogger(__name__)


@dataclass
class TokenBatches:
    """Tokenized examples (or packs) -> micro-batches -> summed token cross-entropy.

    `flat`: each micro-batch is one padding-free row (`attention.padding_free` must be active on the model).
    """

    pad_id: int
    seq2seq: bool = False
    flat: bool = False
    count_unit: str = "target_tokens"

    def micro_batches(self, units: Sequence[Mapping], size: int | None, device: torch.device) -> list[MicroBatch]:
        size = size or len(units)
        pieces = [units[i : i + size] for i in range(0, len(units), size)]
        return [self.micro_batch(piece, device) for piece in pieces]

    def micro_batch(self, units: Sequence[Mapping], device: torch.device) -> MicroBatch:
        batch = collate([flat_example(units)], self.pad_id) if self.flat else collate(units, self.pad_id, self.seq2seq)
        mask = batch["attention_mask"]
        inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        return MicroBatch(inputs, target_count(batch, self.seq2seq), int(mask.sum()), mask.numel())

    def loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return token_losses(model, inputs).sum(), {}


class TokenObjective:
    """Supervised fine-tuning on prompt/response, text or chat rows (see the module docstring)."""

    name = "sft"
    count_unit = "target_tokens"

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.tasks: list[TaskData] = load_tasks(cfg.data, cfg.train.seed)  # rows first: a bad file fails before the model loads
        self.data: TrainData | None = None
        self.batches: TokenBatches | None = None
        self.tokenizer: Any = None
        self.added: list[str] = []

    @property
    def units(self) -> list[dict[str, Any]]:
        return self.data.units

    @property
    def truncation(self) -> dict[str, int]:
        return self.data.truncation

    def prepare(self, dtype: torch.dtype, device: torch.device) -> Prepared:
        cfg = self.cfg
        model, self.tokenizer = load_model(cfg.model, dtype=dtype, device=device)
        self.added = add_special_tokens(model, self.tokenizer, cfg.data.add_special_tokens)
        seq2seq = is_seq2seq(model)
        self.data = build_train_data(cfg, self.tasks, self.tokenizer, seq2seq)
        torch.manual_seed(cfg.train.seed)  # the same method init on every rank
        adapted = prepare_model(cfg, model, resized=bool(self.added))
        flat = cfg.train.padding_free and cfg.method in PACKABLE_METHODS and enable_padding_free(model)
        self.batches = TokenBatches(self.tokenizer.pad_token_id, seq2seq, flat)
        return Prepared(model, self.tokenizer, adapted, self.added)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        return epoch_batches(self.data.lengths, self.cfg.train.batch_size, self.cfg.train.seed, epoch)

    def micro_batches(self, units: Sequence[Mapping], size: int | None, device: torch.device) -> list[MicroBatch]:
        return self.batches.micro_batches(units, size, device)

    def loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.batches.loss(model, inputs)

    def describe(self, unit: Mapping) -> str:
        return f"{unit.get('task', '?')}: {self.tokenizer.decode(unit['input_ids'][:24])!r}..."

    def validate(self, forward: nn.Module, adapted: AdaptedModel, step: int) -> Validation | None:
        cfg, device = self.cfg, next(adapted.parameters()).device
        val_loss = evaluate_loss(forward, self.data.validation, self.batches.pad_id, cfg.train.batch_size, device, self.batches.seq2seq)
        if val_loss is None:
            return None
        record: dict[str, Any] = {"val_loss": val_loss, "val_ppl": perplexity(val_loss)}
        score = val_loss
        if cfg.train.select_by == "rougeL":
            score = record["val_rougeL"] = validation_rouge_l(
                adapted, self.tokenizer, self.tasks, cfg.generate.max_new_tokens, cfg.train.batch_size
            )
        log.info("step %d: validation loss %.4f (ppl %.2f)%s", step, val_loss, record["val_ppl"],
                 f", ROUGE-L {score:.4f}" if cfg.train.select_by == "rougeL" else "")
        return Validation(record, score)

    def save(self, adapted: AdaptedModel, out: Path, info: Distributed) -> Path:
        return save_result(self.cfg, adapted, self.tokenizer, self.tasks, out, info, self.added)

    def report(self, adapted: AdaptedModel, out: Path, info: Distributed) -> dict[str, Any]:
        cfg = self.cfg
        sampling = cfg.generate.num_samples and info.is_main and info.kind != "fsdp"
        samples = sample_answers(cfg, adapted, self.tokenizer, self.tasks[0]) if sampling else []
        return {"samples": samples, "truncation": self.data.truncation}


def adapter_metadata(cfg: RunConfig, tasks: list[TaskData], tokenizer: Any, added: list[str]) -> dict[str, Any]:
    """What `peftkit.json` records so every later command formats prompts as training did."""
    task = tasks[0]
    meta = {
        "run_config": cfg.to_dict(),
        "prompt_format": task.format.to_dict(),
        "response_column": task.response,
        "data_shape": task.shape,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "base_model": builtin_origin(cfg.model),
    }
    if len(tasks) > 1:
        meta["tasks"] = {t.name: {"prompt_format": t.format.to_dict(), "response_column": t.response, "weight": t.weight} for t in tasks}
    if added:
        meta["added_tokens"] = added
    return meta


def save_result(
    cfg: RunConfig, adapted: AdaptedModel, tokenizer: Any, tasks: list[TaskData], out: Path,
    info: Distributed = Distributed(), added: list[str] | None = None,
) -> Path:
    """The adapter (PEFT format + peftkit.json), or a full model folder for `method: full`.

    Every rank gathers the weights (FSDP shards them); rank 0 writes. An adapter trained with added
    tokens carries its tokenizer, so it loads on a fresh base.
    """
    target = out / "adapter"
    meta = adapter_metadata(cfg, tasks, tokenizer, added or [])
    if info.is_main:
        atomic_write_json(out / "summary.json", {"adapter": str(target), "trainable": adapted.trainable_report()})
    if cfg.method == "full":
        weights = {k: distributed.full_tensor(v) for k, v in adapted.model.state_dict().items()}
        if info.is_main:
            with atomic_dir(target) as tmp:
                adapted.model.save_pretrained(tmp, state_dict=weights)
                tokenizer.save_pretrained(tmp)
                (tmp / "peftkit.json").write_text(json.dumps({"format_version": 1, "method": "full", **meta}, indent=2, default=str))
        distributed.barrier(info)
        return target
    tensors = adapted.adapter_state_dict(ADAPTER_NAME)
    if info.is_main:
        adapted.save_adapter(target, ADAPTER_NAME, metadata=meta, tensors=tensors)
        if added:
            tokenizer.save_pretrained(target)
    distributed.barrier(info)
    return target


def sample_answers(cfg: RunConfig, adapted: AdaptedModel, tokenizer: Any, task: TaskData) -> list[dict[str, str]]:
    """Base (adapter disabled) vs tuned answers on the first few test (or validation) rows."""
    rows = (task.test or task.validation)[: cfg.generate.num_samples]
    if not rows or task.shape != "prompt_response":
        return []
    decoding = Decoding.from_config(cfg.generate)  # as `peftkit eval` decodes: same settings, same answers
    tuned = answer_rows(adapted, tokenizer, task.format, rows, decoding)
    if cfg.method == "full":
        base = ["(full fine-tuning: the base weights were changed)"] * len(rows)
    else:
        with adapted.disable_adapter():
            base = answer_rows(adapted, tokenizer, task.format, rows, decoding)
    settings = f"{decoding.describe()}, {weights_label(adapted)} weights"
    return [
        {"prompt": task.format.render(r), "reference": str(r[task.response]), "base": b, "tuned": t, "settings": settings}
        for r, b, t in zip(rows, base, tuned)
    ]
