"""The training recipe, top to bottom: model + method -> data -> loop -> adapter -> samples.

Example:
    >>> from peftkit.config import load_config
    >>> result = run_training(load_config("configs/default.yaml", ["train.epochs=1"]))
    >>> result.adapter_dir
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..adapters import AdaptedModel
from ..config import RunConfig
from ..data.datasets import TaskData, collate, length_grouped_order, load_task, tokenize_task_rows
from ..errors import ConfigError, PeftkitError
from ..generate import generate_texts
from ..io import atomic_dir, atomic_write_json, atomic_write_text
from ..models import builtin_origin, is_seq2seq, load_model, resolve_device, resolve_dtype
from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .loss import loss_sum_and_count

log = logging.getLogger(__name__)
ADAPTER_NAME = "default"


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    steps: int
    seconds: float
    train_tokens: int
    tokens_per_s: float
    first_loss: float
    last_loss: float
    val_loss: float | None
    trainable: str
    samples: list[dict[str, str]] = field(default_factory=list)
    peak_rss_gb: float | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_model(cfg: RunConfig, model: nn.Module) -> AdaptedModel:
    """Wrap the base and attach the configured method (full fine-tuning unfreezes everything)."""
    from ..methods import get_method

    adapted = AdaptedModel(model)
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return adapted
    method = get_method(cfg.method)
    adapted.add_adapter(ADAPTER_NAME, getattr(cfg, method.name))
    return adapted


def make_schedule(optimizer: torch.optim.Optimizer, cfg: RunConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(cfg.train.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.train.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.train.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The data order of one epoch: a pure function of (seed, epoch), so a resume can replay it."""
    return length_grouped_order(lengths, batch_size, random.Random(seed * 1000 + epoch))


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: list[dict], pad_id: int, batch_size: int, device: torch.device) -> float | None:
    """Mean token loss over `examples` (None when there are none)."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    seq2seq = is_seq2seq(model)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[start : start + batch_size]], pad_id, seq2seq)
        loss_sum, n = loss_sum_and_count(model, to_device(batch, device))
        total, count = total + float(loss_sum), count + n
    model.train(was_training)
    return total / max(1, count)


def peak_rss_gb() -> float | None:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    except (ImportError, OSError):
        return None


def _trim_metrics(path: Path, keep_through: int) -> None:
    """Drop records logged after the step we (re)start from, so a resumed log has no duplicates."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= keep_through]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _log_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def run_training(
    cfg: RunConfig, resume: bool = False, on_step: Callable[[dict[str, Any]], None] | None = None,
    progress: Any = None,
) -> TrainResult:
    """Fine-tune `cfg.model` with `cfg.method` on `cfg.data`; save the adapter to output_dir/adapter."""
    started = time.perf_counter()
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    if not resume and list_checkpoints(ckpt_dir):
        raise PeftkitError(f"{out} already holds checkpoints; pass --resume to continue, or choose another output_dir")
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    dtype = resolve_dtype(cfg.train.precision, device)
    if cfg.method == "full" and dtype == torch.bfloat16:
        dtype = torch.float32  # full fine-tuning keeps fp32 master weights; bf16 weights would lose small updates

    # -- data (before the model: a bad file fails in a second, not after loading weights)
    task = load_task(cfg.data, cfg.train.seed)
    model, tokenizer = load_model(cfg.model, dtype=dtype, device=device)
    seq2seq = is_seq2seq(model)
    train_examples, stats = tokenize_task_rows(
        task.train, tokenizer, task, cfg.data.max_length, cfg.train.seed, cfg.data.train_on_prompt, seq2seq
    )
    val_examples, _ = tokenize_task_rows(
        task.validation, tokenizer, task, cfg.data.max_length, cfg.train.seed, cfg.data.train_on_prompt, seq2seq,
        sample_phrasings=False,
    )
    if not train_examples:
        raise PeftkitError("no training example has target tokens within data.max_length; raise data.max_length")
    log.info("data %s: %s", task.name, task.counts)

    # -- model + method
    torch.manual_seed(cfg.train.seed)
    adapted = prepare_model(cfg, model)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    params = [p for p in adapted.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"method {cfg.method!r} left no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    lengths = [len(e["input_ids"]) for e in train_examples]
    steps_per_epoch = math.ceil(len(train_examples) / cfg.train.batch_size)
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    scheduler = make_schedule(optimizer, cfg, total_steps)

    # -- resume
    step, first_loss, last_loss = 0, float("nan"), float("nan")
    tokens_seen = 0
    if resume:
        found = list_checkpoints(ckpt_dir)
        if not found:
            raise PeftkitError(f"--resume: no checkpoint in {ckpt_dir}; start without --resume")
        state = load_checkpoint(found[-1], adapted, optimizer, scheduler)
        step, first_loss, tokens_seen = state["step"], state["first_loss"], state["tokens_seen"]
        log.info("resumed from %s", found[-1])
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    _trim_metrics(metrics_path, keep_through=step)
    atomic_write_text(out / "config.yaml", _dump_yaml(cfg.to_dict()))

    # -- loop
    adapted.train()
    task_bar = progress.add_task("train", total=total_steps, completed=step, loss=float("nan"), tps=0.0) if progress else None
    loop_start, loop_tokens = time.perf_counter(), 0
    while step < total_steps:
        epoch, index = divmod(step, steps_per_epoch)
        batch_ids = epoch_batches(lengths, cfg.train.batch_size, cfg.train.seed, epoch)[index]
        batch = to_device(collate([train_examples[i] for i in batch_ids], tokenizer.pad_token_id, seq2seq), device)
        loss_sum, count = loss_sum_and_count(adapted, batch)
        loss = loss_sum / max(1, count)
        loss.backward()
        grad_norm = (
            float(torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)) if cfg.train.max_grad_norm > 0 else None
        )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        real_tokens = int(batch["attention_mask"].sum())
        tokens_seen += real_tokens
        loop_tokens += real_tokens
        last_loss = float(loss)
        if math.isnan(first_loss):
            first_loss = last_loss
        if not math.isfinite(last_loss):
            raise PeftkitError(f"loss became {last_loss} at step {step} (epoch {epoch}, batch {index}); lower train.lr")
        tps = loop_tokens / max(1e-9, time.perf_counter() - loop_start)
        record = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": last_loss,
                  "lr": scheduler.get_last_lr()[0], "tokens_per_s": round(tps, 1), "target_tokens": count,
                  "grad_norm": grad_norm}
        if step % cfg.train.log_every == 0 or step == total_steps:
            _log_jsonl(metrics_path, record)
        if progress is not None:
            progress.update(task_bar, completed=step, loss=last_loss, tps=tps)
        if on_step:
            on_step(record)
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < total_steps:
            save_checkpoint(ckpt_dir, adapted, optimizer, scheduler,
                            {"step": step, "first_loss": first_loss, "tokens_seen": tokens_seen})
    train_seconds = time.perf_counter() - loop_start

    # -- save, validate, sample
    val_loss = evaluate_loss(adapted, val_examples, tokenizer.pad_token_id, cfg.train.batch_size, device)
    if val_loss is not None:
        _log_jsonl(metrics_path, {"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))})
    adapter_dir = save_result(cfg, adapted, tokenizer, task, out)
    save_checkpoint(ckpt_dir, adapted, optimizer, scheduler, {"step": step, "first_loss": first_loss, "tokens_seen": tokens_seen})
    samples = sample_answers(cfg, adapted, tokenizer, task) if cfg.generate.num_samples else []
    return TrainResult(
        output_dir=out, adapter_dir=adapter_dir, steps=step, seconds=time.perf_counter() - started,
        train_tokens=tokens_seen, tokens_per_s=loop_tokens / max(1e-9, train_seconds),
        first_loss=first_loss, last_loss=last_loss, val_loss=val_loss, trainable=adapted.trainable_report(),
        samples=samples, peak_rss_gb=peak_rss_gb(),
    )


def adapter_metadata(cfg: RunConfig, task: TaskData, tokenizer: Any) -> dict[str, Any]:
    """What `peftkit.json` records so every later command formats prompts as training did."""
    return {
        "run_config": cfg.to_dict(),
        "prompt_format": task.format.to_dict(),
        "response_column": task.response,
        "data_shape": task.shape,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "base_model": builtin_origin(cfg.model),
    }


def save_result(cfg: RunConfig, adapted: AdaptedModel, tokenizer: Any, task: TaskData, out: Path) -> Path:
    """The adapter (PEFT format + peftkit.json), or a full model folder for `method: full`."""
    target = out / "adapter"
    meta = adapter_metadata(cfg, task, tokenizer)
    if cfg.method == "full":
        with atomic_dir(target) as tmp:
            adapted.model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "peftkit.json").write_text(json.dumps({"format_version": 1, "method": "full", **meta}, indent=2, default=str))
        return target
    adapted.save_adapter(target, ADAPTER_NAME, metadata=meta)
    atomic_write_json(out / "summary.json", {"adapter": str(target), "trainable": adapted.trainable_report()})
    return target


def sample_answers(cfg: RunConfig, adapted: AdaptedModel, tokenizer: Any, task: TaskData) -> list[dict[str, str]]:
    """Base (adapter disabled) vs tuned answers on the first few test (or validation) rows."""
    rows = (task.test or task.validation)[: cfg.generate.num_samples]
    if not rows or task.shape != "prompt_response":
        return []
    gen = {"max_new_tokens": cfg.generate.max_new_tokens, "batch_size": len(rows)}
    tuned = generate_texts(adapted, tokenizer, task.format, rows, **gen)
    if cfg.method == "full":
        base = ["(full fine-tuning: the base weights were changed)"] * len(rows)
    else:
        with adapted.disable_adapter():
            base = generate_texts(adapted, tokenizer, task.format, rows, **gen)
    return [
        {"prompt": task.format.render(r), "reference": str(r[task.response]), "base": b, "tuned": t}
        for r, b, t in zip(rows, base, tuned)
    ]


def _dump_yaml(obj: Any) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False)
