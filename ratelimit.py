"""Rate limits: failed requests per client, refreshes per token, and a ceiling on calls to Spotify.

This module decides what is counted and when (`Limits`), and wires itself into a Flask app with
`init_app`. The routes call `admit()` before each call to Spotify; answers are counted after each
request. What a refusal looks like over HTTP is the app's business: it renders `Refused`.
The parts live next door: the storage the counts are kept in (`limitstore`), the queue of a
client's concurrent calls (`admission`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from typing import TypeVar

from flask import Flask, Response, current_app, g, request
from limits import RateLimitItem, parse_many
from limits.storage import Storage
from limits.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter
from limits.util import WindowStats

import logs
from admission import Admission, WindowCount
from config import Config
from limitstore import ProcessMemory, StorageWatch, storage_for

T = TypeVar("T")

# While a shared storage is down, it is asked whether it is back after 1, 2, 4, ... 2**MAX_STORAGE_CHECKS
# seconds, then from 1 s again: flask-limiter's back-off (its MAX_BACKEND_CHECKS).
MAX_STORAGE_CHECKS = 5
# How many more calls in flight an address earns, at most, by calls of its that succeeded: room for
# the users behind one carrier NAT, and the most a burst of junk can overshoot the failure budget.
SUCCESS_ROOM = 10
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
    REASONS = (FAILURES, TOKEN, CEILING, BUSY)

    def __init__(self, retry_after: int, reason: str):
        self.retry_after = retry_after
        self.reason = reason
        super().__init__(f"{reason} limit reached, retry after {retry_after} s")


# -- Flask wiring ---------------------------------------------------------------------------------


def init_app(app: Flask, config: Config, *, clock: Callable[[], float] = time.time) -> None:
    """Count and refuse requests of this app as the configuration says; nothing if every limit is off. `clock`,
    the app's wall clock, cuts the windows of memory storage (tests move it instead of waiting for a window)."""
    if not (config.rate_limit_failures or config.spotify_max_rate or config.rate_limit_per_token):
        return
    limits = Limits(
        config.rate_limit_failures,
        config.spotify_max_rate,
        config.rate_limit_storage_uri,
        per_token=config.rate_limit_per_token,
        wait=config.timeout,
        logger=app.logger,
        storage=storage_for(config.rate_limit_storage_uri, clock),
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


def memory_storage_warning(config: Config, workers: int) -> str | None:
    """The start-up warning when memory:// storage multiplies the limits by the workers; None if it does not.

    Each worker counts on its own, so every limit it keeps (the failure budget, a token's
    refreshes, the ceiling on calls to Spotify) is `workers` times itself on each instance.
    """
    if workers <= 1 or not config.rate_limit_storage_uri.startswith("memory://"):
        return None
    counts = [
        ("a client's failure budget", "RATE_LIMIT_FAILURES", config.rate_limit_failures),
        ("a token's refreshes", "RATE_LIMIT_PER_TOKEN", config.rate_limit_per_token),
        ("the calls to Spotify", "SPOTIFY_MAX_RATE", config.spotify_max_rate),
    ]
    parts = [
        f"{what} up to {workers} x {name} ({_rates(value, 1)}) = {_rates(value, workers)}"
        for what, name, value in counts
        if value
    ]
    if not parts:
        return None
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return (
        f"RATE_LIMIT_STORAGE_URI is memory://: each of the {workers} workers counts on its own, so on each "
        f"instance {listed}. Set RATE_LIMIT_STORAGE_URI to a Redis URL to count them once."
    )


def _rates(value: str, times: int) -> str:
    # Written out, not as the variable's own text: gunicorn's logger cuts a value at ";" (a code
    # could follow one in a request line), and several windows are joined with ";".
    return ", ".join(
        f"{times * item.amount} per "
        + (item.GRANULARITY.name if item.multiples == 1 else f"{item.multiples} {item.GRANULARITY.name}s")
        for item in parse_many(value)
    )


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


def storage_answers() -> bool:
    """Whether the current app's rate-limit storage answers (GET /readyz): True with no limits or memory://."""
    limits: Limits | None = current_app.extensions.get("ratelimit")
    return limits is None or limits.storage_answers()


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


def _log_bad_address(spelling: str) -> None:
    limits: Limits = current_app.extensions["ratelimit"]
    if limits.log_throttle.allows("bad address"):
        current_app.logger.warning(
            "X-Forwarded-For entry %s is not an address: counting its requests under the "
            "connection's own address (logged at most once a minute)",
            logs.client_field(spelling),  # escaped and cut: a header is the client's to fill
        )


# -- the counts -----------------------------------------------------------------------------------


class Strategies:
    """limits' strategies on one storage: its sliding-window counter for the failure budgets and the
    ceiling on calls to Spotify (an approximation that may count a little more or less than happened,
    fine for budgets of dozens), and its moving window for a token's refreshes, which is exact: a client
    that refreshes within its rate is never refused (a token's few entries are cheap to keep)."""

    def __init__(self, storage: Storage) -> None:
        self.counter = SlidingWindowCounterRateLimiter(storage)
        self.moving = MovingWindowRateLimiter(storage)

    def of(self, namespace: str) -> SlidingWindowCounterRateLimiter | MovingWindowRateLimiter:
        """The strategy that counts this namespace: "token" (refreshes), or "failures" and "spotify"."""
        return self.moving if namespace == "token" else self.counter


def _retry_after(reset_at: float) -> int:
    # Rounded up, so that a client that waits exactly this long is never refused again.
    return max(1, math.ceil(reset_at - time.time()))


def _token_key(refresh_token: str) -> str:
    # Never the token itself: the storage (Redis) is not a place for credentials.
    return hashlib.sha256(refresh_token.encode("utf-8")).hexdigest()[:32]


class Limits:
    """The failure budget of each client, the refreshes of each token, and the ceiling on calls to Spotify.

    A failure is counted once its answer is known (`count_failure`). Before that, `check` refuses
    a client whose budget is spent, and `admit` keeps a client from having more calls to Spotify
    in flight (in this process) than it has failures left, plus its calls that succeeded in the
    window up to SUCCESS_ROOM (`count_success`): a burst of concurrent junk gets no further than
    the budget plus SUCCESS_ROOM, while thousands of real users behind one address are not
    refused but take turns, more of them at once as their calls succeed.
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
        storage: Storage | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        """`storage`: the one to count in (default: built from `storage_uri`); a storage other than this
        process's memory is shared, and falls back to memory while it is down. `clock` times the back-off."""
        self._log = logger
        self._wait = wait
        self._failures: list[RateLimitItem] = parse_many(failures) if failures else []
        self._ceilings: list[RateLimitItem] = parse_many(ceiling) if ceiling else []
        self._per_token: list[RateLimitItem] = parse_many(per_token) if per_token else []
        self._storage = storage_for(storage_uri) if storage is None else storage
        self._shared = Strategies(self._storage)
        shared = not isinstance(self._storage, ProcessMemory)
        # A shared storage that stops answering must not take the service down: count in this
        # process's memory meanwhile. One that forgets its counts is said in the log.
        self._fallback = Strategies(ProcessMemory()) if shared else None
        self._watch = StorageWatch(self._storage, logger) if shared else None
        self._clock = clock
        self._storage_lock = threading.Lock()
        self._down = False  # the shared storage failed, and has not answered check() since
        self._checks = 0  # how many times check() was asked since, in this round of the back-off
        self._checked_at = 0.0
        # Successful calls per client in this process, one count per failure limit over a window
        # as long as the limit's. Not a limit, so not the limits library's: its memory storage
        # costs an expiry timer per count, on the path of every successful request.
        self._successes = [WindowCount(item.get_expiry()) for item in self._failures]
        # Lines said at most once a minute per worker (an X-Forwarded-For entry that is no address).
        self.log_throttle = logs.Throttle()
        # Calls to Spotify in flight, and requests waiting for one to end, by client.
        self.admission = Admission()

    @property
    def counts_failures(self) -> bool:
        return bool(self._failures)

    def storage_answers(self) -> bool:
        """Whether the shared storage (Redis) answers now (one round trip, bounded by its socket timeouts);
        always True for this process's memory."""
        if isinstance(self._storage, ProcessMemory):
            return True
        try:
            return bool(self._storage.check())
        except Exception:  # check() says False for the errors it knows; any other is no answer either
            return False

    def check(self, key: str) -> None:
        """Raise Refused if this client has no failures left in its budget."""
        for item in self._failures:
            if not self._test(item, "failures", key):
                raise Refused(self._reset(item, "failures", key), Refused.FAILURES)

    def count_failure(self, key: str) -> None:
        """Count one failed request against this client."""
        for item in self._failures:
            self._hit(item, "failures", key)

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
        spend: list[tuple[RateLimitItem, str] | tuple[RateLimitItem, str, str]] = [
            (item, "spotify") for item in self._ceilings
        ]
        if refresh_token is not None:
            token = _token_key(refresh_token)
            for item in self._per_token:
                if not self._test(item, "token", token):
                    raise Refused(self._reset(item, "token", token), Refused.TOKEN)
            spend += [(item, "token", token) for item in self._per_token]
        if self._failures:
            # Its successes alone make room without reading the failure counts (a storage round
            # trip): check() has just found the client within its budget.
            earned = min(self._earned(successes, key) for successes in self._successes)
            if not self.admission.enter(key, lambda: self._room(key), time.monotonic() + self._wait, earned):
                raise Refused(1, Refused.BUSY)
        try:
            self._spend(spend)
        except BaseException:  # Refused, or the greenlet killed while asking the storage
            self.release(key)
            raise

    def _room(self, key: str) -> int:
        # How many calls of this client may be in flight: its failures left plus the room its
        # successes earned, under every failure limit.
        room = []
        for item, successes in zip(self._failures, self._successes, strict=True):
            stats = self._stats(item, "failures", key)
            if stats.remaining <= 0:
                raise Refused(_retry_after(stats.reset_time), Refused.FAILURES)
            room.append(stats.remaining + self._earned(successes, key))
        return min(room)

    @staticmethod
    def _earned(successes: WindowCount, key: str) -> int:
        return min(successes.get(key), SUCCESS_ROOM)

    def release(self, key: str) -> None:
        """The call to Spotify admitted for this client is over, and its answer counted."""
        if self._failures:
            self.admission.leave(key)

    def _spend(self, spend: list[tuple[RateLimitItem, str] | tuple[RateLimitItem, str, str]]) -> None:
        # Test every ceiling before spending any, so a refused call spends none of them.
        def hit(strategies: Strategies) -> list[tuple[RateLimitItem, str] | tuple[RateLimitItem, str, str]]:
            full = [entry for entry in spend if not strategies.of(entry[1]).test(*entry)]
            return full or [entry for entry in spend if not strategies.of(entry[1]).hit(*entry)]

        full = self._use(hit) if spend else []
        if full:
            retry_after = max(self._reset(*entry) for entry in full)
            token = any(entry[1] == "token" for entry in full)
            raise Refused(retry_after, Refused.TOKEN if token else Refused.CEILING)

    # One operation of the strategy that counts the namespace (identifiers[0]), on the storage or its fallback.
    def _test(self, item: RateLimitItem, *identifiers: str) -> bool:
        return self._use(lambda c: c.of(identifiers[0]).test(item, *identifiers))

    def _hit(self, item: RateLimitItem, *identifiers: str) -> bool:
        return self._use(lambda c: c.of(identifiers[0]).hit(item, *identifiers))

    def _stats(self, item: RateLimitItem, *identifiers: str) -> WindowStats:
        return self._use(lambda c: c.of(identifiers[0]).get_window_stats(item, *identifiers))

    def _reset(self, item: RateLimitItem, *identifiers: str) -> int:
        return _retry_after(self._stats(item, *identifiers).reset_time)

    def _use(self, operation: Callable[[Strategies], T]) -> T:
        """`operation` on the storage's strategies, or on this process's memory while a shared storage
        is down (flask-limiter's in-memory fallback: an error marks it down, the operation is done in
        memory, and the storage's check() says when it is back, tried after 1, 2, 4 ... 32 s)."""
        if self._fallback is None:
            return operation(self._shared)
        if self._down and not self._back():
            return operation(self._fallback)
        try:
            result = operation(self._shared)
        except Exception as err:
            self._went_down(err)
            return operation(self._fallback)
        if self._watch is not None and self._watch.due():
            try:
                self._watch.look()
            except Exception:  # an outage: the next operation meets it, and says so
                pass
        return result

    def _went_down(self, err: Exception) -> None:
        with self._storage_lock:
            if self._down:
                return
            self._down, self._checks, self._checked_at = True, 0, self._clock()
        # The error's type and text (host and port, never a password), no traceback; once per outage.
        self._log.error(
            "Rate limit storage unreachable (%s: %s); counting in this worker's memory until it answers "
            "again (looked for after 1, 2, 4 ... 32 s)", type(err).__name__, err,
        )

    def _back(self) -> bool:
        """Whether the storage is back: asked (check(), a PING within its 1 s timeout) by one request at a
        time, once its back-off has passed; the others count in memory meanwhile."""
        with self._storage_lock:
            if not self._down:
                return True
            now = self._clock()
            if self._checks > MAX_STORAGE_CHECKS:
                self._checks = 0
            if now - self._checked_at <= 2 ** self._checks:
                return False
            self._checked_at, self._checks = now, self._checks + 1
        try:
            answers = bool(self._storage.check())
        except Exception:
            answers = False
        if answers:
            with self._storage_lock:
                self._down = False
            self._log.warning("Rate limit storage answers again: counting there again")
        return answers
