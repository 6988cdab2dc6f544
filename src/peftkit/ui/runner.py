"""One UI job as its own process: `python -m peftkit.ui.runner RUN_DIR KIND ARGS...`.

KIND is `train` or `eval`; ARGS go to that `peftkit` command. The runner records its pid when it
starts and the exit code when it ends in RUN_DIR/ui-KIND.json, so the UI knows what happened even
when it was restarted in between (runs outlive the UI). It is the `peftkit` command itself, not a
wrapper: SIGINT reaches the training loop, which checkpoints and exits 130.

Example:
    $ python -m peftkit.ui.runner runs/r8 train runs/r8/config.yaml --resume
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .. import cli
from ..io import atomic_write_json
from .runs import JOB_KINDS, job_file


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    return exc.code if isinstance(exc.code, int) else 1


def run_job(run_dir: Path, kind: str, args: list[str]) -> int:
    """Run `peftkit KIND ARGS`, recording the start and the exit code; returns the exit code."""
    record = {"kind": kind, "pid": os.getpid(), "args": args, "started": time.time(), "ended": None, "exit_code": None}
    atomic_write_json(job_file(run_dir, kind), record)
    code = 1
    try:
        cli.main([kind, *args])
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc)
    finally:
        atomic_write_json(job_file(run_dir, kind), {**record, "ended": time.time(), "exit_code": code})
    return code


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in JOB_KINDS:
        print(f"usage: python -m peftkit.ui.runner RUN_DIR {{{','.join(JOB_KINDS)}}} ARGS...", file=sys.stderr)
        return 2
    return run_job(Path(argv[0]), argv[1], argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
