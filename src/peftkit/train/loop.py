"""The training recipe, top to bottom: data -> model + method -> loop (validate, checkpoint) ->
adapter -> logs and report. Works on one process or many (torchrun: DDP or FSDP2).

This is the ONE training loop: every task's objective (objectives.py: the token loss of
tokens.py, the encoder losses of encoders.py) gets the same seeding, resume, NaN / Inf guard
before the optimizer step, SIGINT / SIGTERM handling, full-disk handling, checkpoints,
metrics and progress.

Example:
    >>> from peftkit.config import load_config
    >>> result = run_training(load_config("configs/default.yaml", ["train.epochs=1"]))
    >>> result.adapter_dir
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..adapters import AdaptedModel
from ..config import RunConfig
from ..errors import ConfigError, Interrupted, PeftkitError
from ..io import atomic_write_json, atomic_write_text, is_disk_full, recover_interrupted_writes
from ..models import resolve_device
from ..precision import choose_dtype, describe
from . import distributed
from .checkpoint import list_checkpoints, load_best, load_checkpoint, save_best, save_checkpoint
from .distributed import Distributed
from .encoders import ClassificationObjective, EmbeddingObjective
from .interrupt import StopRequest, stop_on_signals
from .logs import MetricsLog
from .objectives import Objective, ObjectiveForward
from .optim import build_optimizer
from .preference import PreferenceObjective
from .setup import enable_gradient_checkpointing
from .step import accumulate_gradients
from .tokens import TokenObjective
from .validate import Selection

log = logging.getLogger(__name__)


RUN_FILES = ("adapter", "best", "config.yaml", "metrics.jsonl", "metrics.csv", "summary.json", "loss_curve.png")
"""What a run writes atomically into output_dir (besides checkpoints/)."""


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
    best_score: float | None = None
    """Best validation score (`select_by`: loss, or ROUGE-L F1)."""
    best_step: int | None = None
    select_by: str = "val_loss"
    stopped_early: bool = False
    padding_fraction: float = 0.0
    """Share of the trained positions that were padding."""
    truncation: dict[str, int] = field(default_factory=dict)
    loss_curve: Path | None = None
    world_size: int = 1
    task: str = "generation"
    test: dict[str, dict[str, float]] = field(default_factory=dict)
    """Encoder tasks: {"base": scores with the adapter disabled, "adapter": with it} on `split` (empty when it has no rows)."""
    split: str = ""
    """Encoder tasks: the split `test` scores (test, else validation)."""
    precision: dict[str, str] = field(default_factory=dict)
    """{"device", "dtype", "reason"}: what the run computed in, and why (also in summary.json)."""


@dataclass
class Progress:
    """What a checkpoint must carry besides weights, optimizer, scheduler and RNG."""

    step: int = 0
    first_loss: float = float("nan")
    tokens_seen: int = 0
    positions_seen: int = 0
    selection: Selection = field(default_factory=Selection)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "first_loss": self.first_loss, "tokens_seen": self.tokens_seen,
                "positions_seen": self.positions_seen, "selection": self.selection.to_dict()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Progress":
        return cls(raw["step"], raw["first_loss"], raw["tokens_seen"], raw.get("positions_seen", 0),
                   Selection(**raw.get("selection", {})))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def deterministic_kernels(enabled: bool) -> Iterator[None]:
    """`train.deterministic`: what PyTorch's reproducibility notes ask for, for the run only.

    cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it creates its handle, so it is set before any CUDA matmul.
    An op with no deterministic kernel then raises, naming itself.
    """
    if not enabled:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]


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


def peak_rss_gb() -> float | None:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    except (ImportError, OSError):
        return None


def check_run_options(cfg: RunConfig, info: Distributed) -> None:
    if cfg.train.select_by == "rougeL" and info.kind == "fsdp":
        raise ConfigError("train.select_by: rougeL generates text, which this trainer does not do on FSDP shards; use ddp")
    if info.active and cfg.train.batch_size < info.world_size:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} is the global batch; it must be at least the "
                          f"{info.world_size} processes torchrun started")


def run_training(
    cfg: RunConfig, resume: bool = False, on_step: Callable[[dict[str, Any]], None] | None = None,
    progress: Any = None,
) -> TrainResult:
    """Fine-tune `cfg.model` with `cfg.method` on `cfg.data`; save the adapter to output_dir/adapter.

    Under torchrun, every process runs this; only rank 0 writes files and draws `progress`.
    SIGINT / SIGTERM end the run after the current step with a checkpoint (`Interrupted`); a full
    disk ends it with a message (`PeftkitError`), the newest complete checkpoint intact.
    """
    info, device = distributed.setup(cfg.train.distributed, resolve_device(cfg.train.device))
    try:
        with stop_on_signals() as stop, deterministic_kernels(cfg.train.deterministic):
            return _train(cfg, resume, on_step, progress if info.is_main else None, info, device, stop)
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        raise PeftkitError(disk_full_message(Path(cfg.output_dir))) from None
    finally:
        distributed.teardown(info)


def disk_full_message(out: Path) -> str:
    found = list_checkpoints(out / "checkpoints")
    kept = f"the newest complete checkpoint, {found[-1]}, is intact" if found else "no checkpoint was written yet"
    again = "resume with `peftkit train <same config> --resume`" if found else "run again"
    return f"no space left on device while writing to {out}: {kept}; free space and {again}"


OBJECTIVES: dict[str, Callable[[RunConfig], Objective]] = {
    "generation": TokenObjective,
    "embedding": EmbeddingObjective,
    "classification": ClassificationObjective,
    "dpo": PreferenceObjective,
    "orpo": PreferenceObjective,
}
"""The objective of each `task:`, and of each preference `objective:` (dpo, orpo) of a generation task."""


def _train(
    cfg: RunConfig, resume: bool, on_step: Any, progress: Any, info: Distributed, device: torch.device, stop: StopRequest,
) -> TrainResult:
    started = time.perf_counter()
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    check_run_options(cfg, info)
    if info.is_main:  # a killed run may have left temp folders, or a folder between its two renames
        recover_interrupted_writes(out, RUN_FILES)
        recover_interrupted_writes(ckpt_dir)
    if not resume and list_checkpoints(ckpt_dir):
        raise PeftkitError(f"{out} already holds checkpoints; pass --resume to continue, or choose another output_dir")
    seed_everything(cfg.train.seed)
    dtype, reason = choose_dtype(cfg.train.precision, device, full_finetune=cfg.method == "full")
    precision = describe(dtype, reason, device)
    log.info("precision: %s on %s (%s)", precision["dtype"], device, reason)

    # -- data (rows before the model: a bad file fails in a second), model + method (same init on every rank)
    objective = OBJECTIVES[cfg.task if cfg.objective == "sft" else cfg.objective](cfg)
    prepared = objective.prepare(dtype, device)
    adapted = prepared.adapted
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(prepared.model)
    forward = distributed.wrap(ObjectiveForward(objective, adapted), info, device)
    torch.manual_seed(cfg.train.seed + info.rank)  # per-rank dropout streams
    params = [p for p in forward.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"method {cfg.method!r} left no trainable parameters")
    optimizer = build_optimizer(params, cfg.train, device)
    steps_per_epoch = math.ceil(len(objective.units) / cfg.train.batch_size)
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    scheduler = make_schedule(optimizer, cfg, total_steps)

    # -- resume: weights, optimizer, scheduler, RNG; the step number is the data position
    state = Progress(selection=Selection(cfg.train.select_by))
    if resume:
        found = list_checkpoints(ckpt_dir)
        if not found:
            raise PeftkitError(f"--resume: no checkpoint in {ckpt_dir}; start without --resume")
        state = Progress.from_dict(load_checkpoint(found[-1], adapted, optimizer, scheduler, info, root=forward))
        log.info("resumed from %s (step %d of %d)", found[-1], state.step, total_steps)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", _dump_yaml(cfg.to_dict()))
    metrics = MetricsLog(out, info.is_main, resume_step=state.step)

    # -- loop
    forward.train()
    bar = progress.add_task("train", total=total_steps, completed=state.step, loss=float("nan"), tps=0.0) if progress else None
    loop_start, loop_tokens, last_loss = time.perf_counter(), 0, float("nan")
    paused = 0.0  # seconds spent validating and checkpointing, left out of tokens/s
    stopped_early = False
    while state.step < total_steps and not stopped_early:
        epoch, index = divmod(state.step, steps_per_epoch)
        batch_ids = objective.epoch_batches(epoch)[index]
        result = accumulate_gradients(forward, [objective.units[i] for i in batch_ids], cfg.train.micro_batch_size, device, info)
        grad_norm = clip_gradients(params, cfg.train.max_grad_norm)
        if not (math.isfinite(result.loss) and math.isfinite(grad_norm)):
            raise PeftkitError(non_finite_message(result.loss, grad_norm, state.step + 1, epoch, index, batch_ids, objective, ckpt_dir))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens_seen += result.tokens
        state.positions_seen += result.positions
        loop_tokens += result.tokens
        last_loss = result.loss
        if math.isnan(state.first_loss):
            state.first_loss = last_loss
        elapsed = time.perf_counter() - loop_start
        tps = loop_tokens / max(1e-9, elapsed - paused)
        record = {"step": state.step, "epoch": round(state.step / steps_per_epoch, 4), "loss": last_loss, **result.metrics,
                  "lr": scheduler.get_last_lr()[0], "tokens_per_s": round(tps, 1), objective.count_unit: result.count,
                  "padding_fraction": round(1 - result.tokens / max(1, result.positions), 4), "grad_norm": grad_norm,
                  "elapsed_s": round(elapsed, 2)}
        if state.step % cfg.train.log_every == 0 or state.step == total_steps:
            metrics.write(record)
        if progress is not None:
            progress.update(bar, completed=state.step, loss=last_loss, tps=tps)
        if on_step:
            on_step(record)
        pause_start = time.perf_counter()
        if evaluation_due(cfg, state.step, steps_per_epoch, total_steps):
            stopped_early = validate(cfg, objective, forward, adapted, state, metrics, out, info)
        if cfg.train.save_every and state.step % cfg.train.save_every == 0 and state.step < total_steps:
            save_checkpoint(ckpt_dir, adapted, optimizer, scheduler, state.to_dict(), cfg.train.keep_checkpoints, info, forward)
        paused += time.perf_counter() - pause_start
        if state.step < total_steps and stop.requested(info):
            saved = ckpt_dir / f"step-{state.step}"
            if not saved.is_dir():
                saved = save_checkpoint(ckpt_dir, adapted, optimizer, scheduler, state.to_dict(), cfg.train.keep_checkpoints, info, forward)
            name = signal_name(stop.signal_number)
            raise Interrupted(f"{name}: stopped after step {state.step} of {total_steps}; checkpoint saved to {saved}; "
                              f"continue with `peftkit train <same config> --resume`", stop.signal_number or 0)
    train_seconds = time.perf_counter() - loop_start - paused
    if stopped_early:
        log.info("early stopping at step %d: no improvement in %d evaluations", state.step, cfg.train.early_stopping_patience)

    # -- the final artifact (the best validation step's weights with train.load_best), checkpoint, report, logs
    save_checkpoint(ckpt_dir, adapted, optimizer, scheduler, state.to_dict(), cfg.train.keep_checkpoints, info, forward)
    if cfg.train.load_best and state.selection.best_step is not None:
        load_best(out / "best", adapted)
        log.info("final adapter = best validation step %d (%s %.4f)", state.selection.best_step, cfg.train.select_by, state.selection.best)
    adapter_dir = objective.save(adapted, out, info)
    report = objective.report(adapted, out, info)
    if info.is_main:  # the objective wrote summary.json; the loop adds the precision it chose
        atomic_write_json(out / "summary.json", {**json.loads((out / "summary.json").read_text()), "precision": precision})
    final_record = report.pop("record", None)
    if final_record:
        metrics.write({"step": state.step, **final_record})
    curve = metrics.finish()
    val_records = [r for r in metrics.records() if "val_loss" in r] if info.is_main else []
    return TrainResult(
        output_dir=out, adapter_dir=adapter_dir, steps=state.step, seconds=time.perf_counter() - started,
        train_tokens=state.tokens_seen, tokens_per_s=loop_tokens / max(1e-9, train_seconds),
        first_loss=state.first_loss, last_loss=last_loss, val_loss=val_records[-1]["val_loss"] if val_records else None,
        trainable=adapted.trainable_report(), peak_rss_gb=peak_rss_gb(),
        best_score=state.selection.best, best_step=state.selection.best_step, select_by=cfg.train.select_by,
        stopped_early=stopped_early, padding_fraction=1 - state.tokens_seen / max(1, state.positions_seen),
        loss_curve=curve, world_size=info.world_size, task=cfg.task, precision=precision, **report,
    )


def non_finite_message(
    loss: float, grad_norm: float | None, step: int, epoch: int, index: int, batch_ids: list[int], objective: Objective,
    ckpt_dir: Path,
) -> str:
    """Name the step and the examples whose loss (or gradient) was NaN / Inf, and the checkpoint to go back to."""
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
    shown = [f"#{i} ({objective.describe(objective.units[i])})" for i in batch_ids[:4]]
    more = f" and {len(batch_ids) - 4} more" if len(batch_ids) > 4 else ""
    found = list_checkpoints(ckpt_dir)
    kept = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"
    return (f"{what} at step {step} (epoch {epoch}, batch {index}; training examples {', '.join(shown)}{more}); "
            f"the weights were not updated and {kept}. Lower train.lr, set train.max_grad_norm, or fix those rows; "
            "then resume with --resume")


def signal_name(number: int | None) -> str:
    return signal.Signals(number).name if number else "signal"


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip to `max_norm` (when positive) and return the gradient norm before clipping. With clipping
    off the norm is still measured, so the NaN / Inf guard sees a non-finite gradient before the step."""
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def evaluation_due(cfg: RunConfig, step: int, steps_per_epoch: int, total_steps: int) -> bool:
    """At each epoch's end, every `eval_every` steps, and after the last step."""
    every = cfg.train.eval_every
    return step % steps_per_epoch == 0 or bool(every and step % every == 0) or step == total_steps


def validate(
    cfg: RunConfig, objective: Objective, forward: nn.Module, adapted: AdaptedModel, state: Progress,
    metrics: MetricsLog, out: Path, info: Distributed,
) -> bool:
    """Score the validation split; keep the best weights in output_dir/best/; True to stop early."""
    scored = objective.validate(forward, adapted, state.step)
    if scored is None:
        return False
    record: dict[str, Any] = {"step": state.step, **scored.record}
    if scored.score is None:
        metrics.write(record)
        return False
    improved = state.selection.update(scored.score, state.step)
    record["best"] = improved
    metrics.write(record)
    if improved:
        save_best(out / "best", adapted, {"step": state.step, cfg.train.select_by: scored.score, **scored.record}, info)
    return state.selection.should_stop(cfg.train.early_stopping_patience)


def _dump_yaml(obj: Any) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False)
