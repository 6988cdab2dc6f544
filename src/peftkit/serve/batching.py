"""The waiting queue and who joins the running batch: continuous (between any two decode steps) or static.

A group is a set of requests that can share a forward pass: the base and every plain-LoRA
adapter mix freely (row-routed); an adapter that cannot be row-routed is batched only with
itself. Requests join in arrival order, never overtaking: while the oldest waiting request
belongs to another group, the running batch takes no one and drains, then that group runs.

- **continuous**: waiting requests of the running group join between decode steps, as long as
  the batch has a free row and the KV cache's budget still holds their prompt and max_tokens.
- **static** (the baseline the benchmark compares with): a batch forms when the running one is
  empty (up to `max_batch_size`, waiting at most `max_wait_ms` for company) and runs to its end.

Example:
    >>> queue = Scheduler(max_batch_size=8, max_wait_ms=10, continuous=True)
    >>> queue.put(seq, group="mixed")
    >>> group, joining = queue.admit(running_group=None, running=0, fits=lambda extra: True, timeout=1.0)
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable, Hashable, Sequence as Seq

from .decode import Sequence


class Scheduler:
    """Thread-safe FIFO of (group, arrival time, sequence) and the admission rule."""

    def __init__(self, max_batch_size: int, max_wait_ms: float, continuous: bool = True) -> None:
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.continuous = continuous
        self._items: deque[tuple[Hashable, float, Sequence]] = deque()
        self._ready = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._ready:
            return sum(1 for _, _, s in self._items if not s.cancelled.is_set())

    def put(self, seq: Sequence, group: Hashable) -> None:
        with self._ready:
            if self._closed:
                seq.fail(503, "the server is shutting down")
                return
            self._items.append((group, time.monotonic(), seq))
            self._ready.notify()

    def close(self) -> None:
        """Refuse new requests and wake the consumer (shutdown)."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def reopen(self) -> None:
        with self._ready:
            self._closed = False

    def admit(
        self, running_group: Hashable, running: int, fits: Callable[[Seq[Sequence]], bool], timeout: float,
    ) -> tuple[Hashable, list[Sequence]]:
        """(group, sequences to join now). With nothing running, waits up to `timeout` for a request
        (static: then up to max_wait_ms for company); `fits(extra)` says whether the batch's KV budget
        holds the running rows plus `extra`."""
        with self._ready:
            self._drop_cancelled()
            if running:
                if not self.continuous or not self._items or self._items[0][0] != running_group:
                    return running_group, []
                return running_group, self._take(running_group, running, fits)
            if not self._ready.wait_for(lambda: self._items or self._closed, timeout) or self._closed:
                return None, []
            group, arrived, _ = self._items[0]
            if not self.continuous:
                self._wait_for_company(group, arrived + self.max_wait_s)
            return group, self._take(group, 0, fits)

    def _wait_for_company(self, group: Hashable, deadline: float) -> None:
        while sum(1 for g, _, _ in self._items if g == group) < self.max_batch_size and not self._closed:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._ready.wait(left)

    def _take(self, group: Hashable, running: int, fits: Callable[[Seq[Sequence]], bool]) -> list[Sequence]:
        """The oldest requests of `group`, in order, while a row is free and the budget holds them."""
        taken: list[Sequence] = []
        rest: deque[tuple[Hashable, float, Sequence]] = deque()
        full = False
        for item in self._items:
            if not full and item[0] == group and running + len(taken) < self.max_batch_size and fits([*taken, item[2]]):
                taken.append(item[2])
            else:
                full = full or item[0] == group  # later requests of the group must not overtake this one
                rest.append(item)
        self._items = rest
        return taken

    def _drop_cancelled(self) -> None:
        """Requests whose client left before they ran are forgotten."""
        self._items = deque(item for item in self._items if not item[2].cancelled.is_set())

    def adapters(self) -> set[str | None]:
        """The adapters waiting requests need (so they are not evicted under them)."""
        with self._ready:
            return {s.adapter for _, _, s in self._items}

    def drain(self) -> list[Sequence]:
        """Everything still queued (to fail it at shutdown)."""
        with self._ready:
            items, self._items = [s for _, _, s in self._items], deque()
            return items
