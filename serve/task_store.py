"""A bounded, thread-safe store of adapted tasks for the HTTP service.

Each adapted task holds a copy of the model's weights, so the store is bounded two ways: at most
`max_tasks` entries (adding one more evicts the least recently used), and an entry idle for more
than `ttl_s` seconds is dropped. Expired entries are removed lazily, on every access, so no
background thread is needed. An evicted or unknown id simply is not there (the service answers
404). The clock is injectable so tests need not sleep.

`RedisTaskStore` keeps the same contract in a Redis server (`--task-store redis://...`), so a
task survives a restart of the service and replicas behind one address share their tasks.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, TypeVar

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


class StoreUnavailable(Exception):
    """The shared task store cannot be reached or is full: the service answers 503."""


class RedisTaskStore:
    """The same contract in Redis, so tasks survive a restart and replicas share them.

    Each task is one key `{prefix}{id}` holding its encoded state, with the idle TTL as the key's
    expiry (refreshed on every read, `GETEX`); a sorted set `{prefix}ids` scores each id by its
    last use, so that more than `max_tasks` evicts the least recently used, as in memory. The
    prefix names the adapter (the digest of its files), so services of one adapter share tasks
    and services of different adapters never mix them. Values are bytes from `encode` and back
    through `decode` (`serve.tensor_file`: arrays only, never pickle). Every Redis call has a
    2-second timeout; a Redis that is down, slow or out of memory raises `StoreUnavailable`.
    """

    def __init__(
        self, url: str, namespace: str, encode: Callable[[T], bytes],
        decode: Callable[[bytes], T], max_tasks: int = 256, ttl_s: float = 600.0,
        timeout_s: float = 2.0,
    ) -> None:
        TaskStore(max_tasks, ttl_s)  # the same checks of the limits
        try:
            import redis
        except ImportError:
            raise UsageError("--task-store redis://... needs the redis package: pip install "
                             "redis (or the serve extra)") from None
        try:
            self.client = redis.Redis.from_url(url, socket_timeout=timeout_s,
                                               socket_connect_timeout=timeout_s)
        except ValueError as exc:
            raise UsageError(f"--task-store {url}: {exc}") from None
        self.errors = (redis.exceptions.RedisError, OSError)
        self.url, self.prefix = url, f"maml:{namespace}:"
        self.encode, self.decode = encode, decode
        self.max_tasks, self.ttl_s = max_tasks, ttl_s
        self.evicted = 0

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except self.errors as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "OOM" in reason or "maxmemory" in reason:
                reason = "it is full: OOM, Redis's maxmemory is reached"
            raise StoreUnavailable(f"the task store {self._shown()} cannot {what} ({reason}); "
                                   "retry later, or send support and queries together to "
                                   "POST /v1/predict") from None

    def _shown(self) -> str:
        return self.url.split("://", 1)[-1].split("@")[-1]  # never a password

    def _trim(self, pipe: Any, now: float) -> None:
        pipe.zremrangebyscore(self.prefix + "ids", "-inf", now - self.ttl_s)

    def check(self) -> None:
        """Raise `UsageError` unless the store answers (at start-up)."""
        try:
            self.client.ping()
        except self.errors as exc:
            raise UsageError(f"--task-store {self._shown()} does not answer ({exc}); start "
                             "Redis or pick --task-store memory") from None

    def add(self, value: T) -> str:
        task_id = secrets.token_urlsafe(16)
        data = self.encode(value)

        def run() -> None:
            now = time.time()
            ids = self.prefix + "ids"
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self.prefix + task_id, data, px=max(1, int(self.ttl_s * 1000)))
            pipe.zadd(ids, {task_id: now})
            self._trim(pipe, now)
            pipe.zcard(ids)
            count = pipe.execute()[-1]
            if count > self.max_tasks:
                old = [k.decode() for k, _ in self.client.zpopmin(ids, count - self.max_tasks)]
                if old:
                    self.client.delete(*(self.prefix + k for k in old))
                    self.evicted += len(old)

        self._call("store the task", run)
        return task_id

    def get(self, task_id: str) -> T | None:
        def run() -> bytes | None:
            data = self.client.getex(self.prefix + task_id, px=max(1, int(self.ttl_s * 1000)))
            if data is not None:
                self.client.zadd(self.prefix + "ids", {task_id: time.time()}, xx=True)
            return data

        data = self._call("read the task", run)
        return None if data is None else self.decode(data)

    def delete(self, task_id: str) -> bool:
        def run() -> bool:
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(self.prefix + task_id)
            pipe.zrem(self.prefix + "ids", task_id)
            return bool(pipe.execute()[0])

        return self._call("delete the task", run)

    def __len__(self) -> int:
        def run() -> int:
            pipe = self.client.pipeline(transaction=True)
            self._trim(pipe, time.time())
            pipe.zcard(self.prefix + "ids")
            return int(pipe.execute()[-1])

        return self._call("count the tasks", run)
