"""Rate limits: failed requests per client address, and a ceiling on calls to Spotify.

The counting is the `limits` library's (sliding-window counters in memory or Redis); this module
decides what is counted and when. Nothing here knows HTTP: the app asks and renders the answers.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage, storage_from_string
from limits.strategies import SlidingWindowCounterRateLimiter

T = TypeVar("T")

# After a storage error, how long to count in this process's memory before trying the storage again.
STORAGE_RETRY_SECONDS = 5.0

log = logging.getLogger(__name__)


class Refused(Exception):
    """A limit is reached: retry after retry_after seconds.

    `reason` is FAILURES (the address spent its failure budget), CEILING (the deployment's calls
    to Spotify), or BUSY (the address's calls in flight did not end in time to make room).
    """

    FAILURES, CEILING, BUSY = "failures", "ceiling", "busy"

    def __init__(self, retry_after: int, reason: str):
        self.retry_after = retry_after
        self.reason = reason
        super().__init__(f"{reason} limit reached, retry after {retry_after} s")


def _retry_after(reset_at: float) -> int:
    # Rounded up, so that a client that waits exactly this long is never refused again.
    return max(1, math.ceil(reset_at - time.time()))


def _storage_options(uri: str) -> dict[str, float]:
    # redis-py waits forever by default: a Redis that stops answering would hang every request.
    if uri.startswith(("redis://", "rediss://", "redis+unix://")):
        return {"socket_connect_timeout": 1, "socket_timeout": 1}
    return {}


class _WindowCount:
    """Counts per key over the current window of `seconds` and the one before it.

    Keeping the previous window means no key's count drops to zero at a window's end, when a
    busy address would otherwise lose its room all at once.
    """

    def __init__(self, seconds: float):
        self._seconds = seconds
        self._ends = 0.0
        self._counts: Counter[str] = Counter()
        self._previous: Counter[str] = Counter()

    def _roll(self) -> None:
        now = time.monotonic()
        if now >= self._ends:
            # Only a window that has just ended counts as the previous one.
            self._previous = self._counts if now < self._ends + self._seconds else Counter()
            self._counts = Counter()
            self._ends = now + self._seconds

    def add(self, key: str) -> None:
        self._roll()
        self._counts[key] += 1

    def get(self, key: str) -> int:
        self._roll()
        return self._counts[key] + self._previous[key]


class Limits:
    """The failure budget of each client address, and the deployment's ceiling on calls to Spotify.

    A failure is counted once its answer is known (`count_failure`). Before that, `check` refuses
    an address whose budget is spent, and `admit` keeps an address from having more calls to
    Spotify in flight (in this process) than it has failures left plus successes in the window
    (`count_success`), so a burst of concurrent junk cannot all reach Spotify before the first
    failure is counted, while an address whose calls succeed is not held back: thousands of real
    users can share one address.
    """

    def __init__(
        self,
        failures: str | None,
        ceiling: str | None,
        storage_uri: str = "memory://",
        logger: logging.Logger = log,
    ):
        self._log = logger
        self._failures: list[RateLimitItem] = parse_many(failures) if failures else []
        self._ceilings: list[RateLimitItem] = parse_many(ceiling) if ceiling else []
        self._counter = SlidingWindowCounterRateLimiter(
            storage_from_string(storage_uri, **_storage_options(storage_uri))
        )
        # A shared storage that stops answering must not take the service down: count in this
        # process's memory meanwhile.
        self._fallback = (
            None if storage_uri.startswith("memory://")
            else SlidingWindowCounterRateLimiter(MemoryStorage())
        )
        self._storage_down_until = 0.0
        # Successful calls per address in this process, one count per failure limit over a window
        # as long as the limit's: an address whose calls succeed earns room for more calls in
        # flight (see admit). Not a limit, so not the limits library's: its memory storage costs
        # an expiry timer per count, on the path of every successful request.
        self._successes = [_WindowCount(item.get_expiry()) for item in self._failures]
        # Calls to Spotify in flight, and requests waiting for one to end, by address.
        self._in_flight: Counter[str] = Counter()
        self._waiting: Counter[str] = Counter()
        self._ended = threading.Condition()

    @property
    def counts_failures(self) -> bool:
        return bool(self._failures)

    def check(self, address: str) -> None:
        """Raise Refused if this address has no failures left in its budget."""
        for item in self._failures:
            if not self._use(lambda c: c.test(item, "failures", address)):
                reset_at = self._use(lambda c: c.get_window_stats(item, "failures", address)).reset_time
                raise Refused(_retry_after(reset_at), Refused.FAILURES)

    def count_failure(self, address: str) -> None:
        """Count one failed request against this address."""
        for item in self._failures:
            self._use(lambda c: c.hit(item, "failures", address))

    def count_success(self, address: str) -> None:
        """Count one successful request of this address (never shared: it only sizes admit)."""
        for successes in self._successes:
            successes.add(address)

    def admit(self, address: str, wait: float) -> None:
        """Before a call to Spotify on behalf of this address, after check(): raise Refused, or
        count the call in flight.

        Until its answer is known, a call in flight may be a failure. So an address may have as
        many calls in flight (in this process) as it has failures left, plus the calls of its that
        succeeded in the window: a burst of junk gets no further than its budget, while an address
        whose requests succeed (thousands of users behind one carrier NAT) is soon not held back at
        all. Past that, the request waits up to `wait` seconds for earlier calls to end; it is
        refused only if the budget really is spent. Each admit must be followed by one `release`.
        """
        if self._failures:
            self._admit(address, time.monotonic() + wait)
        if self._ceilings:
            try:
                self._spend_ceiling()
            except BaseException:  # Refused, or the greenlet killed while asking the storage
                self.release(address)
                raise

    def _admit(self, address: str, deadline: float) -> None:
        with self._ended:
            in_flight = self._in_flight[address]
            if all(in_flight < successes.get(address) for successes in self._successes):
                # Its successes alone make room. check() has just found the address within its
                # budget, so the failure counts need not be read again (a storage round trip).
                self._in_flight[address] = in_flight + 1
                return
        while True:
            room = []
            for item, successes in zip(self._failures, self._successes):
                stats = self._use(lambda c: c.get_window_stats(item, "failures", address))
                if stats.remaining <= 0:
                    raise Refused(_retry_after(stats.reset_time), Refused.FAILURES)
                room.append(stats.remaining + successes.get(address))
            with self._ended:
                in_flight = self._in_flight[address]
                if all(in_flight < calls for calls in room):
                    self._in_flight[address] = in_flight + 1
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Refused(1, Refused.BUSY)
                self._waiting[address] += 1
                try:
                    self._ended.wait(left)
                finally:
                    self._waiting[address] -= 1
                    if not self._waiting[address]:
                        del self._waiting[address]

    def release(self, address: str) -> None:
        """The call to Spotify admitted for this address is over, and its answer counted."""
        if not self._failures:
            return
        with self._ended:
            left = self._in_flight[address] - 1
            if left > 0:
                self._in_flight[address] = left
            else:
                del self._in_flight[address]
            if self._waiting[address]:
                self._ended.notify_all()

    def _spend_ceiling(self) -> None:
        # Test every ceiling before spending any, so a refused call spends none of them.
        def spend(counter: SlidingWindowCounterRateLimiter) -> list[RateLimitItem]:
            full = [item for item in self._ceilings if not counter.test(item, "spotify")]
            return full or [item for item in self._ceilings if not counter.hit(item, "spotify")]

        full = self._use(spend)
        if full:
            reset_at = max(
                self._use(lambda c: c.get_window_stats(item, "spotify")).reset_time for item in full
            )
            raise Refused(_retry_after(reset_at), Refused.CEILING)

    def _use(self, operation: Callable[[SlidingWindowCounterRateLimiter], T]) -> T:
        if self._fallback is None:
            return operation(self._counter)
        now = time.monotonic()
        if now >= self._storage_down_until:
            # After an outage, one request at a time tries the storage again; the others keep
            # counting in memory rather than each waiting out a connect timeout.
            probing = self._storage_down_until > 0
            if probing:
                self._storage_down_until = now + STORAGE_RETRY_SECONDS
            try:
                result = operation(self._counter)
            except Exception as err:
                self._storage_down_until = time.monotonic() + STORAGE_RETRY_SECONDS
                # The error's type and text (host and port, never a password), no traceback.
                self._log.error(
                    "Rate limit storage unreachable (%s: %s); counting in this worker's memory "
                    "for the next %.0f s",
                    type(err).__name__, err, STORAGE_RETRY_SECONDS,
                )
            else:
                if probing:
                    self._storage_down_until = 0.0
                return result
        return operation(self._fallback)
