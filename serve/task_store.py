"""A bounded, thread-safe store of adapted tasks for the HTTP service.

Each adapted task holds a copy of the model's weights, so the store is bounded two ways: at most
`max_tasks` entries (adding one more evicts the least recently used), and an entry idle for more
than `ttl_s` seconds is dropped. Expired entries are removed lazily, on every access, so no
background thread is needed. An evicted or unknown id simply is not there (the service answers
404). The clock is injectable so tests need not sleep.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from maml.errors import UsageError

T = TypeVar("T")


class TaskStore(Generic[T]):
    """Least-recently-used entries with an idle time-to-live."""

    def __init__(
        self, max_tasks: int = 256, ttl_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_tasks < 1:
            raise UsageError(f"--max-tasks must be at least 1, got {max_tasks}")
        if not (math.isfinite(ttl_s) and ttl_s > 0):
            raise UsageError(f"--task-ttl must be a positive, finite number of seconds, got "
                             f"{ttl_s}")
        self.max_tasks, self.ttl_s, self.clock = max_tasks, ttl_s, clock
        self._entries: OrderedDict[str, tuple[T, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.evicted = 0

    def _expire(self, now: float) -> None:
        while self._entries:
            oldest, (_, used) = next(iter(self._entries.items()))
            if now - used <= self.ttl_s:
                return
            del self._entries[oldest]
            self.evicted += 1

    def add(self, value: T) -> str:
        """Store `value` under a fresh unguessable id and return the id."""
        task_id = secrets.token_urlsafe(16)
        with self._lock:
            now = self.clock()
            self._expire(now)
            self._entries[task_id] = (value, now)
            while len(self._entries) > self.max_tasks:
                self._entries.popitem(last=False)
                self.evicted += 1
        return task_id

    def get(self, task_id: str) -> T | None:
        """The value under `task_id` (refreshing its idle time), or None if unknown or evicted."""
        with self._lock:
            now = self.clock()
            self._expire(now)
            entry = self._entries.get(task_id)
            if entry is None:
                return None
            self._entries[task_id] = (entry[0], now)
            self._entries.move_to_end(task_id)
            return entry[0]

    def delete(self, task_id: str) -> bool:
        """Remove `task_id`; False if it was not there."""
        with self._lock:
            self._expire(self.clock())
            return self._entries.pop(task_id, None) is not None

    def __len__(self) -> int:
        with self._lock:
            self._expire(self.clock())
            return len(self._entries)
