"""The request queue: concurrent requests are grouped into batches (max size, max wait).

A batch holds requests that can share a forward pass: the base and every plain-LoRA adapter
mix freely (row-routed); an adapter that cannot be row-routed is batched only with itself.

Example:
    >>> queue = BatchQueue(max_batch_size=8, max_wait_ms=10)
    >>> queue.put(seq, group="mixed")
    >>> batch = queue.next_batch(timeout=1.0)     # up to 8 sequences of one group
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Hashable

from .decode import Sequence


class BatchQueue:
    """Thread-safe FIFO of (group, sequence); a batch takes the oldest request's group."""

    def __init__(self, max_batch_size: int, max_wait_ms: float) -> None:
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self._items: deque[tuple[Hashable, float, Sequence]] = deque()
        self._ready = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._ready:
            return len(self._items)

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

    def next_batch(self, timeout: float) -> list[Sequence]:
        """The next batch, or [] after `timeout` seconds with nothing queued (or once closed).

        Waits until the batch is full or the oldest request has waited `max_wait_ms`.
        """
        with self._ready:
            if not self._ready.wait_for(lambda: self._items or self._closed, timeout) or self._closed:
                return []
            group, arrived, _ = self._items[0]
            deadline = arrived + self.max_wait_s
            while self._count(group) < self.max_batch_size and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._ready.wait(left)
            return self._take(group)

    def _count(self, group: Hashable) -> int:
        return sum(1 for g, _, _ in self._items if g == group)

    def _take(self, group: Hashable) -> list[Sequence]:
        batch, rest = [], deque()
        for item in self._items:
            if item[0] == group and len(batch) < self.max_batch_size:
                batch.append(item[2])
            else:
                rest.append(item)
        self._items = rest
        return batch

    def drain(self) -> list[Sequence]:
        """Everything still queued (to fail it at shutdown)."""
        with self._ready:
            items, self._items = [s for _, _, s in self._items], deque()
            return items
