"""Kill a training run with SIGKILL at many points, resume it each time, record what was on disk.

Run by tests/test_crash_resume.py as ONE subprocess: it imports torch and peftkit once, then
forks a child per attempt (a fork costs milliseconds; a fresh interpreter seconds). The parent
never computes with torch before forking (an OpenMP pool does not survive fork); it only reads
files. Each child trains (`--resume` when a checkpoint exists) and dies by SIGKILL at either

- an *event*: just before or after a file-system call of the writers (safetensors / torch.save,
  the fsync of a finished temp folder, each rename, each removal), chosen at random; or
- a *time*: a random delay, so kills also land inside forward, backward and optimizer steps.

After every kill the parent checks that each checkpoint visible under its final name is whole and
loads. Usage: python crash_harness.py CONFIG.yaml REFERENCE_OUT REPORT.json SEED KILLS
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib.figure  # noqa: F401  (imported once here, not in every child that plots the loss curve)
import torch
from safetensors.torch import load_file

import peftkit.adapters
import peftkit.io
from peftkit.config import load_config
from peftkit.train import checkpoint, run_training

REAL_REPLACE = os.replace
WRITER_CALLS: list[tuple[Any, str]] = [
    (checkpoint, "save_file"), (peftkit.adapters, "save_file"), (torch, "save"), (peftkit.io, "_fsync_tree"),
    (peftkit.io, "atomic_write_bytes"), (os, "replace"), (shutil, "rmtree"),
]


def count_writer_events(kill_at: int | None, between_renames: bool = False) -> list[int]:
    """Wrap every writer call; each call is two events (before, after). SIGKILL self at `kill_at`, or
    (`between_renames`) right after an atomic folder write moved the old folder aside."""
    counter = [0]

    def tick() -> None:
        counter[0] += 1
        if counter[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            tick()
            result = fn(*args, **kwargs)
            if between_renames and fn is REAL_REPLACE and str(args[1]).endswith(".old"):
                os.kill(os.getpid(), signal.SIGKILL)
            tick()
            return result

        return wrapped

    for owner, name in WRITER_CALLS:
        setattr(owner, name, wrap(getattr(owner, name)))
    return counter


def child(cfg_path: str, output_dir: Path, resume: bool, kill_at: int | None, report: Path | None, between_renames: bool = False) -> None:
    """In the forked child: train, maybe die at event `kill_at` (or between renames); never returns."""
    try:
        counter = count_writer_events(kill_at, between_renames)
        steps: list[tuple[float, int]] = []  # (seconds since start, writer events so far) at each step's end
        started = time.monotonic()
        cfg = load_config(cfg_path, [f"output_dir={output_dir}"])
        run_training(cfg, resume=resume, on_step=lambda record: steps.append((time.monotonic() - started, counter[0])))
        if report is not None:
            report.write_text(json.dumps({"events": counter[0], "steps": steps, "seconds": time.monotonic() - started}))
        os._exit(0)
    except BaseException:  # noqa: BLE001  (a forked child must never return into the parent's code)
        traceback.print_exc()
        os._exit(1)


def fork_child(*args: Any) -> int:
    pid = os.fork()
    if pid == 0:
        child(*args)
    return pid


def check_on_disk(out: Path) -> dict[str, int]:
    """Every checkpoint under its final name is whole and loads; count what a kill left behind."""
    ckpts = out / "checkpoints"
    visible = sorted(p for p in ckpts.glob("step-*")) if ckpts.is_dir() else []
    for folder in visible:
        state = json.loads((folder / checkpoint.STATE_FILE).read_text())
        assert folder.name == f"step-{state['step']}", folder
        assert load_file(str(folder / checkpoint.WEIGHTS_FILE)), folder
        extra = torch.load(folder / checkpoint.OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        assert {"optimizer", "scheduler", "rng"} <= extra.keys(), folder
    for name in ("best", "adapter"):
        if (out / name).exists():
            assert load_file(str(next((out / name).glob("*.safetensors")))), out / name
    left = [p.suffix for folder in (out, ckpts) if folder.is_dir() for p in folder.glob(".*")]
    return {"checkpoints": len(visible), "leftovers": left.count(".tmp") + left.count(".old"), "between_renames": left.count(".old")}


def run_with_kills(cfg_path: str, out: Path, reference: dict, rng: random.Random, kills: int) -> dict[str, Any]:
    """Attempt k aims its kill at a random point of the k-th of `kills` equal slices of the reference
    run (in writer events or in seconds, alternately), shifted to where this resume starts; the
    last attempt is left to finish."""
    steps = reference["steps"]
    marks = [(0.0, 0)] + [(t, e) for t, e in steps]  # reference time and events when step d was done
    step_time, step_events = (steps[-1][0] - steps[0][0]) / (len(steps) - 1), (steps[-1][1] - steps[0][1]) / (len(steps) - 1)
    setup_time, setup_events = steps[0][0] - step_time, max(0.0, steps[0][1] - step_events)  # a resumed child redoes these
    attempts: list[dict[str, Any]] = []
    while True:
        ckpts = checkpoint.list_checkpoints(out / "checkpoints")
        done = int(ckpts[-1].name.split("-")[1]) if ckpts else 0
        armed = len(attempts) < kills
        by_event = armed and len(attempts) % 2 == 0
        target = (len(attempts) + rng.random()) / kills  # share of the reference run
        done_time, done_events = marks[min(done, len(marks) - 1)]
        kill_at = max(1, round(target * reference["events"] - done_events + (setup_events if done else 0))) if by_event else None
        delay = max(0.05, target * reference["seconds"] - done_time + (setup_time if done else 0))
        between_renames = len(attempts) == 3  # once: between the two renames that replace `best/` (or after a whole run)
        if between_renames:
            delay = reference["seconds"]
        pid = fork_child(cfg_path, out, bool(ckpts), kill_at, None, between_renames)
        status = wait_or_kill(pid, delay if armed and not by_event else None)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        seen = check_on_disk(out)
        attempts.append({"resumed_from": done, "kill_at_event": kill_at, "aimed_between_renames": between_renames, "delay_s": None if by_event or not armed else round(delay, 3),
                         "killed": killed, "exit_code": code, **seen})
        if not killed:
            assert code == 0, f"a resumed run failed (exit {code}); see its traceback above"
            return {"attempts": attempts}


def wait_or_kill(pid: int, delay: float | None) -> int:
    """The child's wait status; SIGKILL it first if it still runs after `delay` seconds (None: never)."""
    deadline = None if delay is None else time.monotonic() + delay
    while deadline is not None and time.monotonic() < deadline:
        finished, status = os.waitpid(pid, os.WNOHANG)
        if finished:
            return status
        time.sleep(0.005)
    if deadline is not None:
        os.kill(pid, signal.SIGKILL)  # a child that exited meanwhile is a zombie until reaped: no error
    return os.waitpid(pid, 0)[1]


def main() -> None:
    cfg_path, reference_out, report_path, seed, kills = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    started = time.monotonic()
    reference_report = report_path.with_suffix(".reference.json")
    pid = fork_child(cfg_path, reference_out, False, None, reference_report)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, "the uninterrupted reference run failed"
    reference = json.loads(reference_report.read_text())
    killed_out = reference_out.with_name(reference_out.name + "-killed")
    result = run_with_kills(cfg_path, killed_out, reference, random.Random(seed), kills)
    report_path.write_text(json.dumps({"reference": reference, "killed_out": str(killed_out), **result,
                                       "seconds": time.monotonic() - started}, indent=1))


if __name__ == "__main__":
    main()
