"""Rate limits: failed requests per client, refreshes per token, and a ceiling on calls to Spotify.

The counting is the `limits` library's (sliding-window counters in memory or Redis); this module
decides what is counted and when, and wires itself into a Flask app with `init_app`. The routes
call `admit()` before each call to Spotify; answers are counted after each request. What a
refusal looks like over HTTP is the app's business: it renders `Refused`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from functools import lru_cache
from typing import TypeVar

from flask import Flask, Response, current_app, g, request
from limits import RateLimitItem, parse_many
from limits.storage import Storage, storage_from_string
from limits.storage.base import SlidingWindowCounterSupport, TimestampedSlidingWindow
from limits.strategies import SlidingWindowCounterRateLimiter

from config import Config

T = TypeVar("T")

# After a storage error, how long to count in this process's memory before trying the storage again.
STORAGE_RETRY_SECONDS = 5.0
# How many more calls in flight an address earns, at most, by calls of its that succeeded: room for
# the users behind one carrier NAT, and the most a burst of junk can overshoot the failure budget.
SUCCESS_ROOM = 10
# How often, at most, a worker logs that an X-Forwarded-For entry was no address.
_BAD_ADDRESS_LOG_SECONDS = 60.0
# Requests that can never be refused nor counted: they read, and never reach Spotify.
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")

log = logging.getLogger(__name__)


class Refused(Exception):
    """A limit is reached: retry after retry_after seconds.

    `reason` is FAILURES (the client spent its failure budget), TOKEN (this refresh token was
    refreshed too often), CEILING (the deployment's calls to Spotify), or BUSY (the client's calls
    in flight did not end in time to make room).
    """

    FAILURES, TOKEN, CEILING, BUSY = "failures", "token", "ceiling", "busy"

    def __init__(self, retry_after: int, reason: str):
        self.retry_after = retry_after
        self.reason = reason
        super().__init__(f"{reason} limit reached, retry after {retry_after} s")


# -- Flask wiring ---------------------------------------------------------------------------------


def init_app(app: Flask, config: Config) -> None:
    """Count and refuse requests of this app as the configuration says; nothing if every limit is off."""
    if not (config.rate_limit_failures or config.spotify_max_rate or config.rate_limit_per_token):
        return
    limits = Limits(
        config.rate_limit_failures,
        config.spotify_max_rate,
        config.rate_limit_storage_uri,
        per_token=config.rate_limit_per_token,
        wait=config.timeout,
        logger=app.logger,
    )
    app.extensions["ratelimit"] = limits
    if not limits.counts_failures:
        return

    @app.before_request
    def refuse_spent_clients() -> None:
        if request.method not in _SAFE_METHODS:
            limits.check(client_key())

    @app.after_request
    def count_answer(response: Response) -> Response:
        # 429 is not a new failure: being told to wait is not the client's mistake, nor is Spotify
        # rate-limiting the app. 5xx are the server's or Spotify's. Successes count only in this
        # process, as a track record that lets more of the client's calls run at once.
        status = response.status_code
        if request.method not in _SAFE_METHODS:
            if status < 300:
                limits.count_success(client_key())
            elif 400 <= status < 500 and status != 429:
                limits.count_failure(client_key())
        return response

    @app.teardown_request
    def release(_: BaseException | None) -> None:
        # After the answer has been counted: until then the call may still turn out a failure.
        key = g.pop("ratelimit_in_flight", None)
        if key is not None:
            limits.release(key)


def admit(refresh_token: str | None = None) -> None:
    """Before a call to Spotify for this request: raise Refused, or let it go (counted in flight).

    `refresh_token` is the raw token of a refresh: each token may be refreshed only so often.
    """
    limits: Limits | None = current_app.extensions.get("ratelimit")
    if limits is None:
        return
    key = client_key()
    limits.admit(key, refresh_token)
    if limits.counts_failures:
        g.ratelimit_in_flight = key


def client_key() -> str:
    """The client's address as its budget knows it: one spelling per address, one per IPv6 /64."""
    key = canonical_address(request.remote_addr or "")
    if key is not None:
        return key
    # Only a forwarded entry can be no address (ProxyFix keeps the connection's own for us).
    connection = request.environ.get("werkzeug.proxy_fix.orig", {}).get("REMOTE_ADDR") or ""
    _log_bad_address(request.remote_addr or "")
    return canonical_address(connection) or "unknown"


@lru_cache(maxsize=4096)
def canonical_address(spelling: str) -> str | None:
    """An address as a budget key, or None if it is none.

    Brackets, a port and a zone id are dropped; an IPv4-mapped IPv6 address is its IPv4 address;
    any other IPv6 address stands for its /64, the block one home or phone is given.
    """
    text = spelling.strip()
    if text.startswith("["):
        text, bracket, _ = text[1:].partition("]")
        if not bracket:
            return None
    elif text.count(":") == 1:  # IPv4 with a port
        text = text.partition(":")[0]
    text = text.partition("%")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


_bad_address_logged = 0.0


def _log_bad_address(spelling: str) -> None:
    global _bad_address_logged
    now = time.monotonic()
    if now - _bad_address_logged >= _BAD_ADDRESS_LOG_SECONDS or not _bad_address_logged:
        _bad_address_logged = now
        current_app.logger.warning(
            "X-Forwarded-For entry %s is not an address: counting its requests under the "
            "connection's own address (logged at most once a minute)",
            # Escaped, and no longer than an address can be: a header is the client's to fill.
            ascii(spelling[:45]) + ("..." if len(spelling) > 45 else ""),
        )


# -- the counts -----------------------------------------------------------------------------------


def _retry_after(reset_at: float) -> int:
    # Rounded up, so that a client that waits exactly this long is never refused again.
    return max(1, math.ceil(reset_at - time.time()))


def _storage_options(uri: str) -> dict[str, float]:
    # redis-py waits forever by default: a Redis that stops answering would hang every request.
    if uri.startswith(("redis://", "rediss://", "redis+unix://")):
        return {"socket_connect_timeout": 1, "socket_timeout": 1}
    return {}


def storage_for(uri: str) -> Storage:
    """The limits storage for RATE_LIMIT_STORAGE_URI: this process's memory, or Redis with timeouts."""
    if uri.startswith("memory://"):
        return ProcessMemory()
    return storage_from_string(uri, **_storage_options(uri))


class ProcessMemory(Storage, SlidingWindowCounterSupport, TimestampedSlidingWindow):
    """A limits storage in this process's memory (memory://), for the sliding-window counters.

    limits' own MemoryStorage rescans every key from a timer every 10 ms while any key lives: with a
    key per refresh token (tens of thousands in a busy minute) that scan cost more CPU than the
    requests. Here an expired key is dropped when it is read, and the rest once a second.
    """

    STORAGE_SCHEME = ["tokenswap+memory"]

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, **options: float | str | bool):
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        self._counts: dict[str, tuple[int, float]] = {}  # key: (count, expires at)
        self._lock = threading.Lock()
        self._sweep_at = 0.0

    @property
    def base_exceptions(self) -> type[Exception]:
        return ValueError

    def _live(self, key: str, now: float) -> tuple[int, float]:
        count, expires = self._counts.get(key, (0, 0.0))
        return (count, expires) if expires > now else (0, 0.0)

    def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        now = time.time()
        with self._lock:
            if now >= self._sweep_at:
                self._sweep_at = now + 1.0
                for stale in [k for k, (_, expires) in self._counts.items() if expires <= now]:
                    del self._counts[stale]
            count, expires = self._live(key, now)
            self._counts[key] = (count + amount, expires or now + expiry)
            return count + amount

    def get(self, key: str) -> int:
        return self._live(key, time.time())[0]

    def get_expiry(self, key: str) -> float:
        now = time.time()
        return self._live(key, now)[1] or now

    def check(self) -> bool:
        return True

    def reset(self) -> int | None:
        with self._lock:
            cleared = len(self._counts)
            self._counts.clear()
        return cleared

    def clear(self, key: str) -> None:
        self._counts.pop(key, None)

    def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        # limits' formula: the previous window's count weighs as much of it as is still inside the
        # sliding window; the TTLs are the seconds left of each window.
        now = time.time()
        previous_key, current_key = self.sliding_window_keys(key, expiry, now)
        previous, current = self.get(previous_key), self.get(current_key)
        previous_ttl = (1 - (((now - expiry) / expiry) % 1)) * expiry if previous else 0.0
        current_ttl = (1 - ((now / expiry) % 1)) * expiry + expiry
        return previous, previous_ttl, current, current_ttl

    def acquire_sliding_window_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        if amount > limit:
            return False
        previous, previous_ttl, current, _ = self.get_sliding_window(key, expiry)
        if math.floor(previous * previous_ttl / expiry + current) + amount > limit:
            return False
        _, current_key = self.sliding_window_keys(key, expiry, time.time())
        self.incr(current_key, 2 * expiry, amount)
        return True

    def clear_sliding_window(self, key: str, expiry: int) -> None:
        for window in self.sliding_window_keys(key, expiry, time.time()):
            self.clear(window)


def _token_key(refresh_token: str) -> str:
    # Never the token itself: the storage (Redis) is not a place for credentials.
    return hashlib.sha256(refresh_token.encode("utf-8")).hexdigest()[:32]


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
    """The failure budget of each client, the refreshes of each token, and the ceiling on calls to Spotify.

    A failure is counted once its answer is known (`count_failure`). Before that, `check` refuses
    a client whose budget is spent, and `admit` keeps a client from having more calls to Spotify
    in flight (in this process) than it has failures left, plus its calls that succeeded in the
    window up to SUCCESS_ROOM (`count_success`): a burst of concurrent junk gets no further than
    the budget plus SUCCESS_ROOM, while thousands of real users behind one address are not
    refused but take turns.
    """

    def __init__(
        self,
        failures: str | None,
        ceiling: str | None,
        storage_uri: str = "memory://",
        *,
        per_token: str | None = None,
        wait: float = 10.0,
        logger: logging.Logger = log,
    ):
        self._log = logger
        self._wait = wait
        self._failures: list[RateLimitItem] = parse_many(failures) if failures else []
        self._ceilings: list[RateLimitItem] = parse_many(ceiling) if ceiling else []
        self._per_token: list[RateLimitItem] = parse_many(per_token) if per_token else []
        self._counter = SlidingWindowCounterRateLimiter(storage_for(storage_uri))
        # A shared storage that stops answering must not take the service down: count in this
        # process's memory meanwhile.
        self._fallback = (
            None if storage_uri.startswith("memory://")
            else SlidingWindowCounterRateLimiter(ProcessMemory())
        )
        self._storage_down_until = 0.0
        # Successful calls per client in this process, one count per failure limit over a window
        # as long as the limit's. Not a limit, so not the limits library's: its memory storage
        # costs an expiry timer per count, on the path of every successful request.
        self._successes = [_WindowCount(item.get_expiry()) for item in self._failures]
        # Calls to Spotify in flight, and requests waiting for one to end, by client.
        self._in_flight: Counter[str] = Counter()
        self._lock = threading.Lock()
        # Requests waiting for one of their client's calls to end, in order: each call that ends
        # wakes the first of its own client's, not all of everyone's.
        self._queues: dict[str, deque[threading.Event]] = {}

    @property
    def counts_failures(self) -> bool:
        return bool(self._failures)

    def check(self, key: str) -> None:
        """Raise Refused if this client has no failures left in its budget."""
        for item in self._failures:
            if not self._use(lambda c: c.test(item, "failures", key)):
                reset_at = self._use(lambda c: c.get_window_stats(item, "failures", key)).reset_time
                raise Refused(_retry_after(reset_at), Refused.FAILURES)

    def count_failure(self, key: str) -> None:
        """Count one failed request against this client."""
        for item in self._failures:
            self._use(lambda c: c.hit(item, "failures", key))

    def count_success(self, key: str) -> None:
        """Count one successful request of this client (never shared: it only sizes admit)."""
        for successes in self._successes:
            successes.add(key)

    def admit(self, key: str, refresh_token: str | None = None) -> None:
        """Before a call to Spotify for this client, after check(): raise Refused, or count the
        call in flight. Each admit of a client that counts failures is followed by one `release`.

        Until its answer is known, a call in flight may be a failure. Past the room the client
        has, the request waits up to `wait` seconds for earlier calls to end; it is refused only
        if the budget really is spent.
        """
        spend = [(item, "spotify") for item in self._ceilings]
        if refresh_token is not None:
            token = _token_key(refresh_token)
            for item in self._per_token:
                if not self._use(lambda c: c.test(item, "token", token)):
                    raise Refused(self._reset(item, "token", token), Refused.TOKEN)
            spend += [(item, "token", token) for item in self._per_token]
        if self._failures:
            self._admit(key, time.monotonic() + self._wait)
        try:
            self._spend(spend)
        except BaseException:  # Refused, or the greenlet killed while asking the storage
            self.release(key)
            raise

    def _admit(self, key: str, deadline: float) -> None:
        with self._lock:
            in_flight = self._in_flight[key]
            if key not in self._queues and all(
                in_flight < self._earned(successes, key) for successes in self._successes
            ):
                # Its successes alone make room. check() has just found the client within its
                # budget, so the failure counts need not be read again (a storage round trip).
                self._in_flight[key] = in_flight + 1
                return
        woken = False  # first in the client's queue: a call ended and handed this request its turn
        try:
            while True:
                room = []
                for item, successes in zip(self._failures, self._successes):
                    stats = self._use(lambda c: c.get_window_stats(item, "failures", key))
                    if stats.remaining <= 0:
                        raise Refused(_retry_after(stats.reset_time), Refused.FAILURES)
                    room.append(stats.remaining + self._earned(successes, key))
                with self._lock:
                    in_flight = self._in_flight[key]
                    # First come, first served: a new request does not pass those already waiting.
                    if (woken or key not in self._queues) and all(in_flight < calls for calls in room):
                        self._in_flight[key] = in_flight + 1
                        return
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise Refused(1, Refused.BUSY)
                    turn = threading.Event()
                    queue = self._queues.setdefault(key, deque())
                    if woken:  # it keeps its place at the head
                        queue.appendleft(turn)
                    else:
                        queue.append(turn)
                woken = turn.wait(left)
                if not woken:
                    with self._lock:
                        woken = turn.is_set()  # handed its turn just as its wait ran out
                        if not woken:
                            self._leave(key, turn)
        except Refused:
            if woken:  # a turn this request does not take: hand it on
                with self._lock:
                    self._wake_next(key)
            raise

    def _leave(self, key: str, turn: threading.Event) -> None:
        queue = self._queues.get(key)
        if queue is not None and turn in queue:
            queue.remove(turn)
            if not queue:
                del self._queues[key]

    def _wake_next(self, key: str) -> None:
        queue = self._queues.get(key)
        if queue:
            queue.popleft().set()
            if not queue:
                del self._queues[key]

    @staticmethod
    def _earned(successes: _WindowCount, key: str) -> int:
        return min(successes.get(key), SUCCESS_ROOM)

    def release(self, key: str) -> None:
        """The call to Spotify admitted for this client is over, and its answer counted."""
        if not self._failures:
            return
        with self._lock:
            left = self._in_flight[key] - 1
            if left > 0:
                self._in_flight[key] = left
            else:
                del self._in_flight[key]
            self._wake_next(key)

    def _spend(self, spend: list[tuple]) -> None:
        # Test every ceiling before spending any, so a refused call spends none of them.
        def hit(counter: SlidingWindowCounterRateLimiter) -> list[tuple]:
            full = [entry for entry in spend if not counter.test(*entry)]
            return full or [entry for entry in spend if not counter.hit(*entry)]

        full = self._use(hit) if spend else []
        if full:
            retry_after = max(self._reset(*entry) for entry in full)
            token = any(entry[1] == "token" for entry in full)
            raise Refused(retry_after, Refused.TOKEN if token else Refused.CEILING)

    def _reset(self, item: RateLimitItem, *identifiers: str) -> int:
        return _retry_after(self._use(lambda c: c.get_window_stats(item, *identifiers)).reset_time)

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
