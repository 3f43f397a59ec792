"""The storage the limits are counted in: this process's memory, and Redis with timeouts on every scheme."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import limits.storage.memory
import pytest
import redis
from limits import parse
from limits.storage import RedisClusterStorage, RedisSentinelStorage, RedisStorage
from limits.strategies import SlidingWindowCounterRateLimiter

from devtools.process import free_port
from devtools.redis import RedisServer
from tests.tools import require
from limitstore import (
    REDIS_TIMEOUT_SECONDS,
    ProcessMemory,
    StorageWatch,
    seconds_to_window_end,
    storage_for,
    storage_options,
)
from ratelimit import Limits, Refused

TIMEOUTS = {"socket_connect_timeout": REDIS_TIMEOUT_SECONDS, "socket_timeout": REDIS_TIMEOUT_SECONDS}


# -- memory:// -------------------------------------------------------------------------------------


def test_process_memory_decides_as_limits_memory_storage_does(monkeypatch):
    """The same sliding-window decisions as limits' MemoryStorage, at the same instants."""
    now = [1_700_000_000.0]
    # limits' MemoryStorage has no clock to pass: its module's view of time is the only seam.
    monkeypatch.setattr(limits.storage.memory.time, "time", lambda: now[0])
    ours = SlidingWindowCounterRateLimiter(ProcessMemory(clock=lambda: now[0]))
    reference = limits.storage.memory.MemoryStorage()
    theirs = SlidingWindowCounterRateLimiter(reference)
    item = parse("5/minute")
    decisions = []
    try:
        for step in [0, 1, 1, 2, 3, 5, 20, 30, 31, 35, 50, 59, 61, 62, 70, 90, 119, 121, 150, 181, 240, 241, 400]:
            now[0] += step
            for key in ("a", "b"):
                decisions.append((ours.hit(item, key), theirs.hit(item, key)))
                assert ours.get_window_stats(item, key).remaining == theirs.get_window_stats(item, key).remaining
    finally:
        reference.timer.cancel()
    assert all(a == b for a, b in decisions), decisions
    assert {a for a, _ in decisions} == {True, False}


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
