"""Run logs: metrics.jsonl (always, one object per record), metrics.csv, TensorBoard when installed,
and a loss-curve PNG at the end. Only the main process writes. `StepLog` is the progress bar of a
log file or a pipe: one line every N steps or M seconds instead of a bar redrawn in place.

Example:
    >>> log = MetricsLog(Path("runs/x"), enabled=True, resume_step=0)
    >>> log.write({"step": 1, "loss": 2.3})
    >>> log.finish()  # metrics.csv + loss_curve.png
    >>> with StepLog(print) as progress:  # the `add_task` / `update` / `advance` calls of a rich Progress
    ...     bar = progress.add_task("train", total=100, loss=float("nan"), tps=0.0)  # "train 0/100: starting"
    ...     progress.update(bar, completed=1, loss=2.3, tps=812.0)  # "train 1/100: loss 2.3000, 812 tok/s, ..."
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..io import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)


def _tensorboard_writer(folder: Path) -> Any:
    """A SummaryWriter when `tensorboard` is installed, else None (it is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(folder))


class MetricsLog:
    """Appends records to `metrics.jsonl` (and TensorBoard); writes the CSV and the plot at the end."""

    def __init__(self, out: Path, enabled: bool, resume_step: int) -> None:
        self.out = out
        self.enabled = enabled
        self.jsonl = out / "metrics.jsonl"
        self.tensorboard = None
        if enabled:
            self._trim(resume_step)
            self.tensorboard = _tensorboard_writer(out / "tensorboard")

    def _trim(self, keep_through: int) -> None:
        """Drop records logged after the step we (re)start from, so a resumed log has no duplicates."""
        if not self.jsonl.exists():
            return
        kept = [line for line in self.jsonl.read_text().splitlines() if line and json.loads(line).get("step", 0) <= keep_through]
        atomic_write_text(self.jsonl, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.jsonl.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def records(self) -> list[dict[str, Any]]:
        if not self.jsonl.exists():
            return []
        return [json.loads(line) for line in self.jsonl.read_text().splitlines() if line]

    def finish(self) -> Path | None:
        """Write metrics.csv and loss_curve.png from the whole log; returns the PNG path."""
        if not self.enabled:
            return None
        if self.tensorboard is not None:
            self.tensorboard.close()
        records = self.records()
        atomic_write_text(self.out / "metrics.csv", records_to_csv(records))
        return plot_loss_curve(records, self.out / "loss_curve.png")


def records_to_csv(records: list[dict[str, Any]]) -> str:
    """One row per record, columns in first-seen order (blank where a record lacks the key)."""
    columns: list[str] = []
    for record in records:
        columns.extend(k for k in record if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()


def plot_loss_curve(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Training loss per step and validation loss per evaluation, as a PNG (matplotlib, Agg)."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / target token)")
    ax.grid(alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def clock(seconds: float) -> str:
    """`75.2` -> `1:15`; `3725` -> `1:02:05`."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass
class _Task:
    description: str
    total: int
    completed: int
    fields: dict[str, Any]
    started: float
    start_completed: int
    """Where this task was when it began (a resumed run starts past 0): the ETA counts from here."""
    shown_at: float = 0.0
    shown_completed: int = -1
    finished: bool = False


class StepLog:
    """Progress as lines for a log file or a pipe: one line when a task starts ("starting"), then one every
    `every_steps` steps or `every_seconds` seconds, whichever comes first, and one at the end. Each line
    has the step, the task's fields (loss, tokens/s) when it has them, the elapsed time and the ETA.

    It answers the calls the training loop and the evaluation make on a rich `Progress` (`add_task`,
    `update`, `advance`, used as a context manager), so the caller picks one or the other.
    `every_steps=None` takes a twentieth of each task's total.
    """

    def __init__(self, emit: Callable[[str], None], every_steps: int | None = None, every_seconds: float = 30.0,
                 clock_fn: Callable[[], float] = time.monotonic) -> None:
        self.emit = emit
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.now = clock_fn
        self.tasks: list[_Task] = []

    def __enter__(self) -> "StepLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> int:
        task = _Task(description, int(total or 0), int(completed), dict(fields), self.now(), int(completed))
        self.tasks.append(task)
        self._show(task)
        return len(self.tasks) - 1

    def update(self, task_id: int, completed: float | None = None, advance: float | None = None, **fields: Any) -> None:
        task = self.tasks[task_id]
        if completed is not None:
            task.completed = int(completed)
        if advance is not None:
            task.completed += int(advance)
        task.fields.update(fields)
        if self._due(task):
            self._show(task)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def _due(self, task: _Task) -> bool:
        if task.finished or task.completed == task.shown_completed:
            return False
        if task.total and task.completed >= task.total:
            return True
        every = self.every_steps or max(1, task.total // 20)
        return task.completed - task.shown_completed >= every or self.now() - task.shown_at >= self.every_seconds

    def _show(self, task: _Task) -> None:
        task.shown_at, task.shown_completed = self.now(), task.completed
        task.finished = bool(task.total) and task.completed >= task.total
        self.emit(f"{task.description} {task.completed}/{task.total}: {self.describe(task)}")

    def describe(self, task: _Task) -> str:
        """The line's text: `starting` before the first step is done; then the fields, elapsed time and ETA."""
        done = task.completed - task.start_completed
        if done <= 0:
            return "starting"
        parts = []
        loss = task.fields.get("loss")
        if isinstance(loss, float) and not math.isnan(loss):
            parts.append(f"loss {loss:.4f}")
        if task.fields.get("tps"):
            parts.append(f"{task.fields['tps']:.0f} tok/s")
        elapsed = self.now() - task.started
        parts.append(f"elapsed {clock(elapsed)}")
        if task.total:
            parts.append(f"ETA {clock(elapsed / done * max(0, task.total - task.completed))}")
        return ", ".join(parts)
