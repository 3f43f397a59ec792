"""The storage the limits are counted in: this process's memory, and Redis with timeouts on every scheme."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import limits.storage.memory
import pytest
import redis
from limits import parse
from limits.storage import RedisClusterStorage, RedisSentinelStorage, RedisStorage, Storage
from limits.storage.base import MovingWindowSupport, SlidingWindowCounterSupport
from limits.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

from devtools.process import free_port
from devtools.redis import RedisServer
from limitstore import (
    REDIS_TIMEOUT_SECONDS,
    ProcessMemory,
    StorageWatch,
    seconds_to_window_end,
    storage_for,
    storage_options,
)
from ratelimit import Limits, Refused
from tests.tools import require

TIMEOUTS = {"socket_connect_timeout": REDIS_TIMEOUT_SECONDS, "socket_timeout": REDIS_TIMEOUT_SECONDS}


# -- memory:// -------------------------------------------------------------------------------------


def decisions_side_by_side(monkeypatch, strategy, rate: str, steps: list[float], keys: tuple[str, ...],
                           stats=lambda stats: stats) -> list:
    """(ours, limits' MemoryStorage's) decision for each hit of each key, the clock moved by each step in turn;
    what `stats` takes of their window stats is compared at every hit."""
    now = [1_700_000_000.0]
    # limits' MemoryStorage has no clock to pass: its module's view of time is the only seam.
    monkeypatch.setattr(limits.storage.memory.time, "time", lambda: now[0])
    ours = strategy(ProcessMemory(clock=lambda: now[0]))
    reference = limits.storage.memory.MemoryStorage()
    theirs = strategy(reference)
    item = parse(rate)
    decisions = []
    try:
        for step in steps:
            now[0] += step
            for key in keys:
                decisions.append((ours.hit(item, key), theirs.hit(item, key)))
                assert stats(ours.get_window_stats(item, key)) == stats(theirs.get_window_stats(item, key))
    finally:
        reference.timer.cancel()
    assert {a for a, _ in decisions} == {True, False}
    return decisions


def test_process_memory_decides_as_limits_memory_storage_does(monkeypatch):
    """The same sliding-window decisions as limits' MemoryStorage, at the same instants."""
    steps = [0, 1, 1, 2, 3, 5, 20, 30, 31, 35, 50, 59, 61, 62, 70, 90, 119, 121, 150, 181, 240, 241, 400]
    decisions = decisions_side_by_side(monkeypatch, SlidingWindowCounterRateLimiter, "5/minute", steps, ("a", "b"),
                                       stats=lambda stats: stats.remaining)
    assert all(a == b for a, b in decisions), decisions


def test_process_memory_forgets_expired_keys():
    now = [1_700_000_000.0]
    storage = ProcessMemory(clock=lambda: now[0])
    for n in range(1000):
        storage.incr(f"token-{n}", 60)
    assert storage.get("token-7") == 1
    now[0] += 61
    assert storage.get("token-7") == 0  # expired as it is read
    storage.incr("fresh", 60)  # and the rest swept, at most once a second
    assert storage.reset() == 1


def test_memory_uri_is_process_memory():
    assert isinstance(storage_for("memory://"), ProcessMemory)
    assert storage_options("memory://") == {}


def test_process_memorys_moving_window_decides_as_limits_memory_storage_does(monkeypatch):
    """The moving window (a token's refreshes): the same decisions as limits' MemoryStorage."""
    steps = [0, 1, 1, 2, 30, 57.5, 0.25, 1, 20, 40, 59, 61, 62, 200]
    decisions = decisions_side_by_side(monkeypatch, MovingWindowRateLimiter, "3/minute", steps, ("k",))
    assert all(a == b for a, b in decisions), decisions


def test_process_memory_counts_concurrent_hits_exactly():
    """Reading the counts and counting are one step: threads (a threaded `flask run`) hitting at once
    never take the same last unit, so exactly the limit gets through."""
    item = parse("200/hour")
    switching = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch as often as they can: a race has every chance
    try:
        for _ in range(5):
            storage = ProcessMemory()
            for strategy in (SlidingWindowCounterRateLimiter(storage), MovingWindowRateLimiter(storage)):
                start = threading.Barrier(8)

                def hits(strategy=strategy, start=start) -> int:
                    start.wait()
                    return sum(strategy.hit(item, "k") for _ in range(60))

                with ThreadPoolExecutor(8) as pool:
                    assert sum(pool.map(lambda _: hits(), range(8))) == 200
    finally:
        sys.setswitchinterval(switching)


# -- a token's refreshes: an exact window -----------------------------------------------------------


@pytest.mark.parametrize("times", [
    [13.0 * n for n in range(40)],  # every 13 s: 4.6 a minute
    [60.0 * burst + n for burst in range(6) for n in range(5)],  # five at once, each minute
    [0, 1, 2, 3, 50, 62, 63, 64, 65, 110, 122.5, 123, 124, 125.5],  # four, then more as the first ones age out
])
def test_a_token_refreshed_within_its_rate_is_never_refused(times):
    """RATE_LIMIT_PER_TOKEN counts a token's refreshes in the last minute exactly (limits' moving window):
    a client that never refreshes more than 5 times in any 60 s is never refused, and the 6th is."""
    now = [1_700_000_000.0]
    start = now[0]
    refreshes = Limits(None, None, per_token="5/minute", storage=ProcessMemory(clock=lambda: now[0]))
    for at in times:
        now[0] = start + at
        refreshes.admit("203.0.113.9", "AQ-the-token")
    with pytest.raises(Refused) as refused:
        for _ in range(6):
            refreshes.admit("203.0.113.9", "AQ-the-token")
    assert refused.value.reason == Refused.TOKEN


# -- the limits on a storage that goes away ----------------------------------------------------------


class Outage(Storage, SlidingWindowCounterSupport, MovingWindowSupport):
    """A shared storage (as Redis is: not this process's memory) that can be taken down and brought back;
    its counts are kept in a ProcessMemory."""

    def __init__(self, clock) -> None:
        super().__init__()
        self.memory = ProcessMemory()
        self.down = False
        self.checks: list[float] = []  # when check() was asked
        self.clock = clock

    @property
    def base_exceptions(self) -> type[Exception]:
        return ConnectionError

    @property
    def up(self) -> ProcessMemory:
        """Its counts, if it is up: every operation fails while it is down, as Redis' do."""
        if self.down:
            raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        return self.memory

    def check(self) -> bool:
        self.checks.append(self.clock())
        return not self.down

    def incr(self, key, expiry, amount=1):
        return self.up.incr(key, expiry, amount)

    def get(self, key):
        return self.up.get(key)

    def get_expiry(self, key):
        return self.up.get_expiry(key)

    def reset(self):
        return self.up.reset()

    def clear(self, key):
        self.up.clear(key)

    def get_sliding_window(self, key, expiry):
        return self.up.get_sliding_window(key, expiry)

    def acquire_sliding_window_entry(self, key, limit, expiry, amount=1):
        return self.up.acquire_sliding_window_entry(key, limit, expiry, amount)

    def clear_sliding_window(self, key, expiry):
        self.up.clear_sliding_window(key, expiry)

    def acquire_entry(self, key, limit, expiry, amount=1):
        return self.up.acquire_entry(key, limit, expiry, amount)

    def get_moving_window(self, key, limit, expiry):
        return self.up.get_moving_window(key, limit, expiry)


def test_a_storage_that_goes_down_falls_back_to_memory_and_is_asked_back_with_flask_limiters_back_off(caplog):
    """As flask-limiter's in_memory_fallback: the first error sends the counting to this process's memory
    (said once, at ERROR); the storage's check() is asked after more than 1, 2, 4 ... 32 s, then from 1 s
    again; once it answers, the counting goes back to it (said once)."""
    now = [100.0]
    storage = Outage(clock=lambda: now[0])
    budgets = Limits("2/hour", None, storage=storage, clock=lambda: now[0])
    storage.down = True
    budgets.count_failure("a")
    budgets.count_failure("a")
    with pytest.raises(Refused):
        budgets.check("a")  # the budget holds in memory meanwhile
    [outage] = [r for r in caplog.records if "Rate limit storage unreachable" in r.getMessage()]
    assert outage.levelno == logging.ERROR and "ConnectionError" in outage.getMessage()
    for _ in range(130):  # a request each second
        now[0] += 1.0
        budgets.check("b")
    gaps = [round(b - a) for a, b in zip([100.0] + storage.checks, storage.checks, strict=False)]
    assert gaps[:8] == [2, 3, 5, 9, 17, 33, 2, 3], gaps
    assert storage.checks[0] == 102.0
    storage.down = False
    asked = len(storage.checks)
    while len(storage.checks) == asked:
        now[0] += 1.0
        budgets.check("b")
    # Counted in the storage again, which holds none of the outage's failures: "a" has its budget there.
    assert budgets.check("a") is None
    budgets.count_failure("a")
    budgets.count_failure("a")
    with pytest.raises(Refused):
        budgets.check("a")
    [back] = [r for r in caplog.records if "answers again: counting there" in r.getMessage()]
    assert back.levelno == logging.WARNING


# -- the window-boundary seam ----------------------------------------------------------------------


def test_seconds_to_window_end_is_the_first_window_to_end():
    assert seconds_to_window_end("5/minute", now=3600 * 1000 + 45) == pytest.approx(15)
    assert seconds_to_window_end("5/hour", now=3600 * 1000 + 45) == pytest.approx(3555)
    assert seconds_to_window_end("100/hour;5/minute", now=3600 * 1000 + 59.5) == pytest.approx(0.5)
    assert 0 < seconds_to_window_end("1/second") <= 1


def test_one_more_gets_through_just_after_a_window_ends_which_is_why_the_seam_exists():
    now = [3600.0 * 1000 + 30]
    counter = SlidingWindowCounterRateLimiter(ProcessMemory(clock=lambda: now[0]))
    item = parse("3/minute")
    assert [counter.hit(item, "k") for _ in range(4)] == [True, True, True, False]
    now[0] += seconds_to_window_end("3/minute", now[0]) + 0.01
    assert counter.hit(item, "k")  # the previous window's three now weigh a little under three


# -- Redis: socket timeouts on every scheme --------------------------------------------------------


def test_redis_urls_get_socket_timeouts():
    for uri in ("redis://127.0.0.1:6390/0", "rediss://127.0.0.1:6390/0", "redis+unix:///tmp/no-such.sock"):
        storage = storage_for(uri)
        assert isinstance(storage, RedisStorage)
        kwargs = storage.storage.connection_pool.connection_kwargs
        assert {name: kwargs.get(name) for name in TIMEOUTS} == TIMEOUTS, uri


def test_redis_sentinel_gets_socket_timeouts_for_the_sentinels_and_the_master():
    # Building the storage asks no sentinel anything: none needs to exist.
    storage = storage_for(f"redis+sentinel://127.0.0.1:{free_port()}/mymaster")
    assert isinstance(storage, RedisSentinelStorage)
    assert {name: storage.sentinel.connection_kwargs.get(name) for name in TIMEOUTS} == TIMEOUTS
    for sentinel in storage.sentinel.sentinels:
        kwargs = sentinel.connection_pool.connection_kwargs
        assert {name: kwargs.get(name) for name in TIMEOUTS} == TIMEOUTS


def start_redis(*args: str) -> RedisServer:
    require("redis-server")
    return RedisServer(*args).start()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[int]:
    """A one-node Redis cluster holding every slot, on a free 127.0.0.1 port."""
    # The cluster bus needs a port of its own (by default the port + 10000, which may not exist).
    server = start_redis(
        "--cluster-enabled", "yes", "--cluster-config-file", str(tmp_path / "nodes.conf"),
        "--cluster-port", str(free_port()),
    )
    port = server.port
    try:
        with redis.Redis(port=port) as node:
            node.execute_command("CLUSTER", "ADDSLOTSRANGE", "0", "16383")
            deadline = time.monotonic() + 10
            while node.execute_command("CLUSTER", "INFO").decode().find("cluster_state:ok") < 0:
                assert time.monotonic() < deadline, "the cluster did not come up"
                time.sleep(0.05)
        yield port
    finally:
        server.stop()


@pytest.mark.e2e
def test_redis_cluster_gets_socket_timeouts_on_every_node(redis_cluster):
    storage = storage_for(f"redis+cluster://127.0.0.1:{redis_cluster}")
    assert isinstance(storage, RedisClusterStorage)
    assert storage.check()
    nodes = storage.storage.get_nodes()
    assert nodes
    for node in nodes:
        kwargs = node.redis_connection.connection_pool.connection_kwargs
        assert {name: kwargs.get(name) for name in TIMEOUTS} == TIMEOUTS


@pytest.mark.e2e
def test_a_redis_that_stops_answering_is_given_up_on_within_the_timeout():
    server = start_redis()
    assert server.process is not None
    process = server.process
    storage = storage_for(server.url)
    try:
        assert storage.check()
        process.send_signal(signal.SIGSTOP)  # the server holds its connections and answers nothing
        started = time.monotonic()
        with pytest.raises(redis.RedisError):
            storage.incr("k", 60)
        assert time.monotonic() - started < REDIS_TIMEOUT_SECONDS + 1
    finally:
        process.send_signal(signal.SIGCONT)
        server.stop()


# -- a storage that forgot its counts ---------------------------------------------------------------


@pytest.fixture
def restartable_redis() -> Iterator[RedisServer]:
    server = start_redis()
    try:
        yield server
    finally:
        server.stop()


def forgot_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "forgot its counts" in r.getMessage()]


@pytest.mark.e2e
def test_a_redis_restarted_empty_is_said_once_by_one_of_the_processes_sharing_it(restartable_redis, caplog):
    uri = f"redis://127.0.0.1:{restartable_redis.port}"
    logger = logging.getLogger("test.storage")
    clock = [0.0]
    watches = [StorageWatch(storage_for(uri), logger, clock=lambda: clock[0]) for _ in range(3)]
    assert not any(watch.look() for watch in watches)  # a fresh Redis: nothing was forgotten
    restartable_redis.restart()
    saw = [watch.look() for watch in watches]
    assert saw == [True, False, False]  # the others find the marker the first one set again
    [warning] = forgot_warnings(caplog)
    assert warning.levelno == logging.WARNING
    assert "appendonly" in warning.getMessage() and "SPOTIFY_MAX_RATE" in warning.getMessage()
    assert not any(watch.look() for watch in watches)
    assert len(forgot_warnings(caplog)) == 1


@pytest.mark.e2e
def test_a_redis_restarted_with_its_data_is_not_said(tmp_path, caplog):
    server = start_redis("--appendonly", "yes", "--dir", str(tmp_path))
    try:
        watch = StorageWatch(storage_for(f"redis://127.0.0.1:{server.port}"), logging.getLogger("test.storage"))
        assert not watch.look()
        server.restart()
        assert not watch.look()
    finally:
        server.stop()
    assert not forgot_warnings(caplog)


def test_the_watch_looks_at_most_once_a_second():
    clock = [100.0]
    watch = StorageWatch(ProcessMemory(), logging.getLogger("test.storage"), clock=lambda: clock[0])
    assert watch.due() and not watch.due()
    clock[0] += 0.5
    assert not watch.due()
    clock[0] += 0.5
    assert watch.due()


@pytest.mark.e2e
def test_limits_say_a_restarted_redis_forgot_the_budgets(restartable_redis, caplog):
    limits = Limits("3/hour", None, f"redis://127.0.0.1:{restartable_redis.port}")
    for _ in range(3):
        limits.count_failure("203.0.113.9")
    with pytest.raises(Refused):
        limits.check("203.0.113.9")
    restartable_redis.restart()
    deadline = time.monotonic() + 10
    while not forgot_warnings(caplog):  # the watch looks at most once a second, as the limits are used
        assert time.monotonic() < deadline, "the forgotten counts were never said"
        limits.check("203.0.113.9")
        time.sleep(0.05)
    limits.check("203.0.113.9")  # what the warning says: the budget starts again
    assert len(forgot_warnings(caplog)) == 1
