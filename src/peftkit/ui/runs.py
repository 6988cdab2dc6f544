"""Run folders seen from the UI: status, metrics, progress; jobs (`peftkit train` / `eval`) started detached.

A job is `python -m peftkit.ui.runner RUN_DIR KIND ARGS` in its own session, so it outlives the
UI and a Ctrl-C in the UI's terminal does not reach it. It records its pid and, at the end, its
exit code in RUN_DIR/ui-KIND.json; its output goes to RUN_DIR/KIND.log. Stop sends SIGINT: the
training loop finishes the step, saves a checkpoint and exits 130.

Example:
    >>> jobs = Jobs(roots)
    >>> jobs.start(roots.run_dir("r8"), "train", ["runs/r8/config.yaml"])
    >>> run_summary(roots.run_dir("r8"), jobs)["status"]
    'running'
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from .errors import UiError
from .paths import Roots

JOB_KINDS = ("train", "eval")
STOPPED_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM)
"""Exit codes of a run stopped by a signal after saving a checkpoint (errors.Interrupted)."""
RECENT_S = 60.0
"""A run the UI did not start counts as running while its metrics.jsonl changed this recently."""


def job_file(run_dir: Path, kind: str) -> Path:
    return run_dir / f"ui-{kind}.json"


def read_job(run_dir: Path, kind: str) -> dict[str, Any] | None:
    """The job record, or None when the UI never started one (or the file is unreadable)."""
    try:
        record = json.loads(job_file(run_dir, kind).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _runner_alive(pid: int) -> bool:
    """Is `pid` a live (not zombie) peftkit UI runner? A recycled pid running something else is not."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError, OverflowError):
        return False
    proc = Path(f"/proc/{pid}")
    if not proc.is_dir():
        return True  # no /proc (macOS): trust the signal check
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = (proc / "cmdline").read_bytes()
    except OSError:
        return False
    return state != "Z" and b"peftkit.ui.runner" in cmdline


class Jobs:
    """Starts jobs and knows which are running (the UI's own children first, then by pid)."""

    def __init__(self, roots: Roots) -> None:
        self.roots = roots
        self.children: dict[tuple[str, str], subprocess.Popen] = {}

    def running(self, run_dir: Path, kind: str) -> bool:
        child = self.children.get((str(run_dir), kind))
        if child is not None and child.poll() is None:
            return True
        record = read_job(run_dir, kind)
        return bool(record and record.get("exit_code") is None and isinstance(record.get("pid"), int)
                    and _runner_alive(record["pid"]))

    def start(self, run_dir: Path, kind: str, args: list[str]) -> None:
        """Start `peftkit KIND ARGS` for this run, detached; refuses while one is running."""
        if self.running(run_dir, kind):
            raise UiError(f"run {run_dir.name!r} already has a {kind} job running; wait for it or stop it", status=409)
        run_dir.mkdir(parents=True, exist_ok=True)
        job_file(run_dir, kind).unlink(missing_ok=True)
        with open(run_dir / f"{kind}.log", "ab") as log:
            self.children[(str(run_dir), kind)] = subprocess.Popen(
                [sys.executable, "-m", "peftkit.ui.runner", str(run_dir), kind, *args], cwd=self.roots.project,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "COLUMNS": "120", "PYTHONUNBUFFERED": "1"},
            )

    def stop(self, run_dir: Path) -> None:
        """SIGINT to the run's training job: it finishes the step, checkpoints and exits."""
        record = read_job(run_dir, "train")
        child = self.children.get((str(run_dir), "train"))
        pid = child.pid if child is not None and child.poll() is None else (record or {}).get("pid")
        if not isinstance(pid, int) or not self.running(run_dir, "train"):
            raise UiError(f"run {run_dir.name!r} is not running", status=409)
        os.kill(pid, signal.SIGINT)

    def reap(self) -> None:
        """Forget finished children (their exit codes are in the job files)."""
        for key in [k for k, child in self.children.items() if child.poll() is not None]:
            del self.children[key]


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's config.yaml as a dict ({} when missing or unreadable)."""
    try:
        raw = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    return raw if isinstance(raw, dict) else {}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records; a line being written (incomplete) is skipped."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def metrics_version(run_dir: Path) -> int:
    """Changes when metrics.jsonl is rewritten (a resumed run trims it atomically: a new inode)."""
    try:
        return (run_dir / "metrics.jsonl").stat().st_ino
    except OSError:
        return 0


def run_status(run_dir: Path, jobs: Jobs) -> str:
    """running | finished | stopped | failed."""
    if jobs.running(run_dir, "train"):
        return "running"
    record = read_job(run_dir, "train")
    code = record.get("exit_code") if record else None
    if code == 0 or (code is None and (run_dir / "adapter").is_dir()):
        return "finished"
    if code in STOPPED_CODES:
        return "stopped"
    if record is None:  # a run started from the command line
        try:
            if time.time() - (run_dir / "metrics.jsonl").stat().st_mtime < RECENT_S:
                return "running"
        except OSError:
            pass
        return "stopped" if _has_checkpoint(run_dir) else "failed"
    return "failed"


def _has_checkpoint(run_dir: Path) -> bool:
    folder = run_dir / "checkpoints"
    return folder.is_dir() and any(p.name.startswith("step-") for p in folder.iterdir())


def progress(config: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Step, total steps and ETA (seconds) from the training records and the config."""
    steps = [r for r in records if "loss" in r and isinstance(r.get("step"), int)]
    if not steps:
        return {"step": 0, "total": None, "eta_s": None}
    last = steps[-1]
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    total = train.get("max_steps")
    if not isinstance(total, int) and last.get("epoch"):
        per_epoch = max(1, round(last["step"] / last["epoch"]))
        total = max(1, math.ceil(float(train.get("epochs", 1)) * per_epoch))
    start_step = 0  # elapsed_s restarts at a resume: time only the current process's steps
    for before, record in zip(steps, steps[1:]):
        if record.get("elapsed_s", 0) < before.get("elapsed_s", 0):
            start_step = before["step"]
    done = last["step"] - start_step
    elapsed = last.get("elapsed_s")
    eta = (total - last["step"]) * elapsed / done if isinstance(total, int) and elapsed and done > 0 else None
    return {"step": last["step"], "total": total, "eta_s": eta}


def _earlier_segments_s(records: list[dict[str, Any]]) -> float:
    """Training seconds of the processes before the last resume (each restarts elapsed_s at 0)."""
    elapsed = [r["elapsed_s"] for r in records if isinstance(r.get("elapsed_s"), (int, float))]
    return sum(before for before, after in zip(elapsed, elapsed[1:]) if after < before)


def wall_time(run_dir: Path, records: list[dict[str, Any]]) -> float | None:
    """Seconds the run took: the UI's last training job (so far) plus the training time of earlier processes;
    for a run without a UI job, the logged training time."""
    record = read_job(run_dir, "train")
    if record and isinstance(record.get("started"), (int, float)):
        return (record.get("ended") or time.time()) - record["started"] + _earlier_segments_s(records)
    elapsed = [r["elapsed_s"] for r in records if isinstance(r.get("elapsed_s"), (int, float))]
    return elapsed[-1] + _earlier_segments_s(records) if elapsed else None


def run_summary(run_dir: Path, jobs: Jobs) -> dict[str, Any]:
    """One row of the Runs page."""
    config = read_config(run_dir)
    records = read_metrics(run_dir)
    val = [r["val_loss"] for r in records if isinstance(r.get("val_loss"), (int, float))]
    return {
        "name": run_dir.name, "status": run_status(run_dir, jobs), "method": config.get("method", "?"),
        "task": config.get("task", "generation"), "model": config.get("model", "?"),
        "best_val_loss": min(val) if val else None, "wall_s": wall_time(run_dir, records),
        "adapter": (run_dir / "adapter").is_dir(), "reports": reports(run_dir), **progress(config, records),
    }


def list_runs(roots: Roots, jobs: Jobs) -> list[dict[str, Any]]:
    """Every run folder under --runs (a folder holding a config.yaml or a UI job), newest first."""
    jobs.reap()
    if not roots.runs.is_dir():
        return []
    folders = [p for p in roots.runs.iterdir() if p.is_dir() and ((p / "config.yaml").is_file() or read_job(p, "train"))]
    folders.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [run_summary(p, jobs) for p in folders]


def log_tail(run_dir: Path, kind: str, lines: int = 40) -> str:
    """The end of a job's log (its error message, when it failed)."""
    try:
        text = (run_dir / f"{kind}.log").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def reports(run_dir: Path) -> list[str]:
    """report.html files of the run (`peftkit eval --out` inside it), relative to the run folder."""
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.glob("*/report.html")) + \
        sorted(str(p.relative_to(run_dir)) for p in run_dir.glob("*/*/report.html"))
