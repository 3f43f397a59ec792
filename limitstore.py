"""Where the rate limits are counted: this process's memory or Redis, built from RATE_LIMIT_STORAGE_URI.

The counting itself is the `limits` library's (its sliding-window counter, and its moving window for the
refreshes of a token); this module builds its storage (Redis with socket timeouts on every scheme the
configuration accepts) and supplies `ProcessMemory`, a cheaper memory storage for memory://.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

from limits import parse_many
from limits.storage import Storage, storage_from_string
from limits.storage.base import MovingWindowSupport, SlidingWindowCounterSupport, TimestampedSlidingWindow

# How long a Redis command, or a connection to Redis, may take before the storage counts as down.
# redis-py waits forever by default: a Redis that stops answering would hang every request.
REDIS_TIMEOUT_SECONDS = 1.0

# How often, at most, each process looks whether the shared storage still holds its marker.
WATCH_SECONDS = 1.0
# The marker's key, and how long it lives: long enough never to expire on its own.
MARKER_KEY = "tokenswap-storage-marker"
_MARKER_SECONDS = 10 * 365 * 24 * 3600

_REDIS_SCHEMES = ("redis://", "rediss://", "redis+unix://", "redis+sentinel://", "redis+cluster://")


def storage_options(uri: str) -> dict[str, object]:
    """The keyword options limits' storage for this URI is built with: socket timeouts for Redis."""
    if not uri.startswith(_REDIS_SCHEMES):
        return {}
    timeouts: dict[str, object] = {
        "socket_connect_timeout": REDIS_TIMEOUT_SECONDS,
        "socket_timeout": REDIS_TIMEOUT_SECONDS,
    }
    if uri.startswith("redis+sentinel://"):
        # The sentinels are asked where the master is before the master itself: they get their
        # own connections, with their own options.
        return {**timeouts, "sentinel_kwargs": dict(timeouts)}
    return timeouts


def storage_for(uri: str, clock: Callable[[], float] = time.time) -> Storage:
    """The limits storage for RATE_LIMIT_STORAGE_URI: this process's memory (its windows cut from `clock`), or
    Redis with timeouts (its own clock)."""
    if uri.startswith("memory://"):
        return ProcessMemory(clock=clock)
    # limits types its options as scalars; sentinel_kwargs is the one documented dict among them.
    storage = storage_from_string(uri, **storage_options(uri))  # type: ignore[arg-type]
    assert isinstance(storage, Storage)  # a synchronous scheme: the configuration accepts no async:// one
    return storage


def seconds_to_window_end(rates: str, now: float | None = None) -> float:
    """Seconds until the first of these rates' fixed windows ends (the sliding window's seam).

    The sliding-window counter weighs the previous fixed window by how much of it is still
    inside the sliding one; just after a window's end that weight drops below 1 and one more
    request gets through. A test that counts against a window can wait this long first.
    """
    at = time.time() if now is None else now
    return min(item.get_expiry() - at % item.get_expiry() for item in parse_many(rates))


class StorageWatch:
    """Notices a shared storage that forgot its counts (Redis restarted empty, flushed, or evicting).

    The storage holds one marker key, set by the first process to look. A process that has seen
    the marker and then finds it gone sets it again; the one process whose set creates it logs a
    WARNING, so each loss is said once per deployment, however many workers share the storage.
    """

    def __init__(
        self,
        storage: Storage,
        logger: logging.Logger,
        every: float = WATCH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._storage = storage
        self._log = logger
        self._every = every
        self._clock = clock
        self._lock = threading.Lock()
        self._due = 0.0
        self._seen = False

    def due(self) -> bool:
        """Whether it is time to look again (at most once per `every` seconds, one caller at a time)."""
        with self._lock:
            now = self._clock()
            if now < self._due:
                return False
            self._due = now + self._every
            return True

    def look(self) -> bool:
        """Look at the marker now: True if the storage had forgotten it. Storage errors pass through."""
        if self._storage.get(MARKER_KEY):
            self._seen = True
            return False
        created = self._storage.incr(MARKER_KEY, _MARKER_SECONDS) == 1
        forgot, self._seen = self._seen, True
        if forgot and created:
            self._log.warning(
                "Rate limit storage forgot its counts (Redis restarted empty, was flushed, or evicted "
                "keys): every client's failure budget, every token's refreshes and SPOTIFY_MAX_RATE "
                "count again from zero. Make Redis persistent (appendonly yes) so that a restart "
                "keeps them (docs/operations.md)."
            )
        return forgot


class ProcessMemory(Storage, SlidingWindowCounterSupport, TimestampedSlidingWindow, MovingWindowSupport):
    """A limits storage in this process's memory (memory://), for the sliding-window counters and the
    moving windows (limits' storage interfaces; the strategies that decide are limits').

    limits' own MemoryStorage rescans every key from a timer every 10 ms while any key lives: with a
    key per refresh token (tens of thousands in a busy minute) that scan cost more CPU than the
    requests. Here an expired key is dropped when it is read, and the rest once a second.
    Every decision (read the counts, then count) is taken under one lock, so that concurrent requests
    (threads under `flask run`, greenlets anywhere) cannot both take the last unit.
    `clock` is the wall clock the windows are cut from (tests pass their own).
    """

    STORAGE_SCHEME = ["tokenswap+memory"]

    def __init__(
        self,
        uri: str | None = None,
        wrap_exceptions: bool = False,
        clock: Callable[[], float] = time.time,
        **options: float | str | bool,
    ):
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        self._clock = clock
        self._counts: dict[str, tuple[int, float]] = {}  # key: (count, expires at)
        self._events: dict[str, tuple[list[float], float]] = {}  # key: (its entries' times, oldest first; expires at)
        # Reentrant: a decision holds it across the reads and the count it makes.
        self._lock = threading.RLock()
        self._sweep_at = 0.0

    @property
    def base_exceptions(self) -> type[Exception]:
        return ValueError

    def _live(self, key: str, now: float) -> tuple[int, float]:
        count, expires = self._counts.get(key, (0, 0.0))
        return (count, expires) if expires > now else (0, 0.0)

    def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        now = self._clock()
        with self._lock:
            self._sweep(now)
            count, expires = self._live(key, now)
            self._counts[key] = (count + amount, expires or now + expiry)
            return count + amount

    def _sweep(self, now: float) -> None:
        # Under the lock: at most once a second, every expired key goes.
        if now >= self._sweep_at:
            self._sweep_at = now + 1.0
            for stale in [k for k, (_, expires) in self._counts.items() if expires <= now]:
                del self._counts[stale]
            for stale in [k for k, (_, expires) in self._events.items() if expires <= now]:
                del self._events[stale]

    def get(self, key: str) -> int:
        with self._lock:
            return self._live(key, self._clock())[0]

    def get_expiry(self, key: str) -> float:
        now = self._clock()
        return self._live(key, now)[1] or now

    def check(self) -> bool:
        return True

    def reset(self) -> int | None:
        with self._lock:
            cleared = len(self._counts) + len(self._events)
            self._counts.clear()
            self._events.clear()
        return cleared

    def clear(self, key: str) -> None:
        with self._lock:
            self._counts.pop(key, None)
            self._events.pop(key, None)

    def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        # limits' formula: the previous window's count weighs as much of it as is still inside the
        # sliding window; the TTLs are the seconds left of each window.
        now = self._clock()
        previous_key, current_key = self.sliding_window_keys(key, expiry, now)
        previous, current = self.get(previous_key), self.get(current_key)
        previous_ttl = (1 - (((now - expiry) / expiry) % 1)) * expiry if previous else 0.0
        current_ttl = (1 - ((now / expiry) % 1)) * expiry + expiry
        return previous, previous_ttl, current, current_ttl

    def acquire_sliding_window_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        if amount > limit:
            return False
        with self._lock:  # read and count as one step: no other request takes the same last unit
            now = self._clock()
            previous, previous_ttl, current, _ = self.get_sliding_window(key, expiry)
            if math.floor(previous * previous_ttl / expiry + current) + amount > limit:
                return False
            _, current_key = self.sliding_window_keys(key, expiry, now)
            self.incr(current_key, 2 * expiry, amount)
            return True

    def _entries(self, key: str, expiry: int, now: float) -> list[float]:
        # The times of the key's entries in the moving window that ends now: younger than expiry seconds.
        times = self._events.get(key, ((), 0.0))[0]
        return [at for at in times if at > now - expiry]

    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        if amount > limit:
            return False
        with self._lock:
            now = self._clock()
            self._sweep(now)
            entries = self._entries(key, expiry, now)
            if len(entries) + amount > limit:
                return False
            self._events[key] = (entries + [now] * amount, now + expiry)
            return True

    def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        with self._lock:
            now = self._clock()
            entries = self._entries(key, expiry, now)
        return (entries[0], len(entries)) if entries else (now, 0)

    def clear_sliding_window(self, key: str, expiry: int) -> None:
        for window in self.sliding_window_keys(key, expiry, self._clock()):
            self.clear(window)
