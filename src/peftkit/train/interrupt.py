"""Ctrl-C (SIGINT) and SIGTERM during training: finish the current step, save a checkpoint, stop.

The handler only records the signal; the loop checks it between steps, so no step, optimizer
update or file write is cut in half. A second signal acts at once (the previous handler is back).
Under torchrun every rank agrees to stop at the same step (one all-reduce of the flag).

Example:
    >>> with stop_on_signals() as stop:
    ...     while training:
    ...         step()
    ...         if stop.requested(info):
    ...             save_checkpoint(...)
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from .distributed import Distributed, sum_over_ranks

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Remembers the first SIGINT / SIGTERM; `requested()` is True from the next step boundary on."""

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self.previous: dict[int, Any] = {}

    def __call__(self, signal_number: int, frame: FrameType | None) -> None:
        self.signal_number = signal_number
        for number, handler in self.previous.items():
            signal.signal(number, handler)  # a second signal stops at once, without a checkpoint
        log.warning("%s: finishing this step and saving a checkpoint (send it again to stop at once)",
                    signal.Signals(signal_number).name)

    def requested(self, info: Distributed) -> bool:
        (ranks_stopping,) = sum_over_ranks([self.signal_number is not None], info)
        if ranks_stopping and self.signal_number is None:
            self.signal_number = signal.SIGTERM  # another rank was signalled (torchrun forwards SIGTERM)
        return bool(ranks_stopping)


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Catch SIGINT / SIGTERM for the block; a signal the process ignores stays ignored.

    Only the main thread can set handlers; elsewhere nothing changes.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    for number in SIGNALS:
        handler = signal.getsignal(number)
        if handler in (signal.SIG_IGN, None):  # ignored on purpose (nohup, a background job), or set outside Python
            continue
        request.previous[number] = handler
        signal.signal(number, request)
    try:
        yield request
    finally:
        for number, handler in request.previous.items():
            signal.signal(number, handler)
