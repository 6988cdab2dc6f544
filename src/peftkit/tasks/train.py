"""The encoder recipe (`task: embedding | classification`), top to bottom: rows -> encoder + LoRA ->
loop (validate each epoch, checkpoint) -> adapter -> base vs adapter on the test split.

It shares the text-generation trainer's pieces (optimizer, schedule, gradient clipping, atomic
checkpoints with resume, metrics.jsonl / csv / loss curve, run folder layout) but not its loop:
that loop batches token-level LM examples and divides by target tokens, while here a batch is a
list of rows scored whole (in-batch negatives need every pair of the batch in one forward).

Example:
    >>> cfg = load_config("configs/embedding-minilm.yaml", ["train.epochs=1"])
    >>> result = run_encoder_training(cfg)
    >>> result.test["base"]["mrr"], result.test["adapter"]["mrr"]
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..adapters import AdaptedModel
from ..config import RunConfig
from ..errors import ConfigError, PeftkitError
from ..io import atomic_write_json, atomic_write_text
from ..models import builtin_origin, load_encoder, resolve_device
from ..precision import resolve_dtype
from ..train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from ..train.logs import MetricsLog
from ..train.loop import clip_gradients, make_schedule, peak_rss_gb, seed_everything
from ..train.optim import build_optimizer
from ..train.setup import ADAPTER_NAME
from .classification import classification_loss, head_module_names
from .data import EncoderData, load_encoder_data
from .embedding import embedding_loss
from .evaluate import before_after, score_split

log = logging.getLogger(__name__)


@dataclass
class EncoderResult:
    output_dir: Path
    adapter_dir: Path
    task: str
    steps: int
    seconds: float
    tokens_per_s: float
    first_loss: float
    last_loss: float
    trainable: str
    test: dict[str, dict[str, float]]
    """{"base": metrics with the adapter disabled, "adapter": with it} on the test split (validation if no test;
    empty when both are)."""
    split: str
    peak_rss_gb: float | None = None


def lora_config(cfg: RunConfig, model: nn.Module) -> Any:
    """`cfg.lora`, with the classification head added to `modules_to_save` (a fresh head must train)."""
    if cfg.task != "classification":
        return cfg.lora
    heads = [h for h in head_module_names(model) if h not in cfg.lora.modules_to_save]
    return dataclasses.replace(cfg.lora, modules_to_save=[*cfg.lora.modules_to_save, *heads])


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """A seeded shuffle per epoch: a pure function of (seed, epoch), so a resume replays it."""
    order = list(range(count))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return order


def batch_loss(cfg: RunConfig, adapted: AdaptedModel, tokenizer: Any, rows: list[dict], data: EncoderData, device: torch.device) -> tuple[torch.Tensor, int]:
    if cfg.task == "embedding":
        return embedding_loss(adapted, tokenizer, rows, cfg, device)
    return classification_loss(adapted, tokenizer, rows, data.labels, cfg, device)


def prepare(cfg: RunConfig, data: EncoderData, device: torch.device) -> tuple[AdaptedModel, Any]:
    """The encoder (with a fresh, seeded head for classification) and the LoRA adapter, fresh or continued."""
    dtype = resolve_dtype(cfg.train.precision, device)
    torch.manual_seed(cfg.train.seed)  # the fresh head: the same in training and in `peftkit eval`'s base column
    model, tokenizer = load_encoder(cfg.model, len(data.labels) if cfg.task == "classification" else None, dtype, device)
    adapted = AdaptedModel(model)
    if cfg.train.init_adapter:
        adapted.load_adapter(cfg.train.init_adapter, name=ADAPTER_NAME)
    else:
        adapted.add_adapter(ADAPTER_NAME, lora_config(cfg, model))
    adapted.to(device)
    return adapted, tokenizer


def run_encoder_training(cfg: RunConfig, resume: bool = False, progress: Any = None) -> EncoderResult:
    """Train `cfg.model` with LoRA on `cfg.task`; save output_dir/adapter and score base vs adapter."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"task {cfg.task} trains in one process; run it without torchrun")
    started = time.perf_counter()
    out, ckpt_dir = Path(cfg.output_dir), Path(cfg.output_dir) / "checkpoints"
    if not resume and list_checkpoints(ckpt_dir):
        raise PeftkitError(f"{out} already holds checkpoints; pass --resume to continue, or choose another output_dir")
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    data = load_encoder_data(cfg)
    log.info("%s on %s: train %d, validation %d, test %d rows", cfg.task, data.name, len(data.train), len(data.validation), len(data.test))
    adapted, tokenizer = prepare(cfg, data, device)
    params = [p for p in adapted.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.train, device)
    steps_per_epoch = math.ceil(len(data.train) / cfg.train.batch_size)
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    scheduler = make_schedule(optimizer, cfg, total_steps)
    state = {"step": 0, "first_loss": float("nan")}
    if resume:
        found = list_checkpoints(ckpt_dir)
        if not found:
            raise PeftkitError(f"--resume: no checkpoint in {ckpt_dir}; start without --resume")
        state = load_checkpoint(found[-1], adapted, optimizer, scheduler)
        log.info("resumed from %s (step %d of %d)", found[-1], state["step"], total_steps)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    metrics = MetricsLog(out, True, resume_step=state["step"])

    bar = progress.add_task("train", total=total_steps, completed=state["step"], loss=float("nan"), tps=0.0) if progress else None
    loop_start, tokens, paused, loss_value = time.perf_counter(), 0, 0.0, float("nan")
    adapted.train()
    while state["step"] < total_steps:
        epoch, index = divmod(state["step"], steps_per_epoch)
        order = epoch_order(len(data.train), cfg.train.seed, epoch)
        rows = [data.train[i] for i in order[index * cfg.train.batch_size : (index + 1) * cfg.train.batch_size]]
        loss, batch_tokens = batch_loss(cfg, adapted, tokenizer, rows, data, device)
        loss.backward()
        grad_norm = clip_gradients(params, cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        loss_value, tokens = float(loss.detach()), tokens + batch_tokens
        if not math.isfinite(loss_value):
            raise PeftkitError(f"loss became {loss_value} at step {state['step']}; lower train.lr")
        if math.isnan(state["first_loss"]):
            state["first_loss"] = loss_value
        elapsed = time.perf_counter() - loop_start
        tps = tokens / max(1e-9, elapsed - paused)
        if state["step"] % cfg.train.log_every == 0 or state["step"] == total_steps:
            metrics.write({"step": state["step"], "epoch": round(state["step"] / steps_per_epoch, 4), "loss": loss_value,
                           "lr": scheduler.get_last_lr()[0], "tokens_per_s": round(tps, 1), "examples": len(rows),
                           "grad_norm": grad_norm, "elapsed_s": round(elapsed, 2)})
        if progress is not None:
            progress.update(bar, completed=state["step"], loss=loss_value, tps=tps)
        pause_start = time.perf_counter()
        if data.validation and (state["step"] % steps_per_epoch == 0 or state["step"] == total_steps):
            scores = score_split(cfg, adapted, tokenizer, data.validation, data.labels, device)
            metrics.write({"step": state["step"], **{f"val_{k}": v for k, v in scores.items()}})
            log.info("step %d: validation %s", state["step"], scores)
            adapted.train()
        if cfg.train.save_every and state["step"] % cfg.train.save_every == 0 and state["step"] < total_steps:
            save_checkpoint(ckpt_dir, adapted, optimizer, scheduler, state, cfg.train.keep_checkpoints)
        paused += time.perf_counter() - pause_start
    train_seconds = time.perf_counter() - loop_start - paused

    save_checkpoint(ckpt_dir, adapted, optimizer, scheduler, state, cfg.train.keep_checkpoints)
    adapter_dir = adapted.save_adapter(out / "adapter", ADAPTER_NAME, metadata=adapter_metadata(cfg, data))
    split = "test" if data.test else "validation"
    test = before_after(cfg, adapted, tokenizer, data.split(split), data.labels, device) if data.split(split) else {}
    metrics.write({"step": state["step"], "split": split, **{f"{who}_{k}": v for who, s in test.items() for k, v in s.items()}})
    metrics.finish()
    atomic_write_json(out / "summary.json", {"adapter": str(adapter_dir), "task": cfg.task, "trainable": adapted.trainable_report(),
                                             "split": split, **test})
    return EncoderResult(
        output_dir=out, adapter_dir=adapter_dir, task=cfg.task, steps=state["step"], seconds=time.perf_counter() - started,
        tokens_per_s=tokens / max(1e-9, train_seconds), first_loss=state["first_loss"], last_loss=loss_value,
        trainable=adapted.trainable_report(), test=test, split=split, peak_rss_gb=peak_rss_gb(),
    )


def adapter_metadata(cfg: RunConfig, data: EncoderData) -> dict[str, Any]:
    """What `peftkit.json` records: the run, the task, the class names in head order, the base's origin."""
    return {"run_config": cfg.to_dict(), "task": cfg.task, "dataset": data.name, "labels": data.labels,
            "base_model": builtin_origin(cfg.model)}
