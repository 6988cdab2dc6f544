"""Run logs: metrics.jsonl (always, one object per record), metrics.csv, TensorBoard when installed,
and a loss-curve PNG at the end. Only the main process writes.

Example:
    >>> log = MetricsLog(Path("runs/x"), enabled=True, resume_step=0)
    >>> log.write({"step": 1, "loss": 2.3})
    >>> log.finish()  # metrics.csv + loss_curve.png
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

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
